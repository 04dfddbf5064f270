//! librdkafka's mock cluster with a settable advertised address, so that a TLS terminator
//! (stunnel) in front of its plaintext listener can be the address clients come back to
//! after bootstrap. rust-rdkafka's `MockCluster` does not wrap
//! `rd_kafka_mock_broker_set_host_port`, hence the few FFI calls here.
#![allow(unsafe_code)] // Why: see the module docs; every call is on a pointer this type owns.

use rdkafka::ClientConfig;
use rdkafka::bindings as rd;
use rdkafka::producer::{BaseProducer, DefaultProducerContext, Producer};
use std::ffi::{CStr, CString};

/// A one-broker mock cluster (broker id 1), destroyed on drop.
pub struct AdvertisedMock {
    cluster: *mut rd::rd_kafka_mock_cluster_t,
    /// The client that owns the cluster (dropped after it).
    _owner: BaseProducer<DefaultProducerContext>,
    /// `127.0.0.1:PORT` of the broker's plaintext listener.
    pub listener: String,
}

// The mock cluster is thread-safe (librdkafka serialises commands on its own thread).
unsafe impl Send for AdvertisedMock {}
unsafe impl Sync for AdvertisedMock {}

impl std::fmt::Debug for AdvertisedMock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdvertisedMock")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

impl AdvertisedMock {
    /// A cluster of one broker with `topic` (`partitions` partitions).
    pub fn new(topic: &str, partitions: i32) -> AdvertisedMock {
        let owner: BaseProducer<DefaultProducerContext> = ClientConfig::new()
            .set("log_level", "3")
            .create()
            .expect("mock owner client");
        // SAFETY: the owner's handle is valid while `owner` lives, which outlives the cluster.
        let cluster = unsafe { rd::rd_kafka_mock_cluster_new(owner.client().native_ptr(), 1) };
        assert!(!cluster.is_null(), "cannot create the mock cluster");
        // SAFETY: `cluster` is valid; the string is copied before the next call.
        let listener = unsafe {
            CStr::from_ptr(rd::rd_kafka_mock_cluster_bootstraps(cluster))
                .to_string_lossy()
                .into_owned()
        };
        let name = CString::new(topic).unwrap();
        // SAFETY: valid cluster and NUL-terminated name.
        let err = unsafe { rd::rd_kafka_mock_topic_create(cluster, name.as_ptr(), partitions, 1) };
        assert_eq!(err, rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
        AdvertisedMock {
            cluster,
            _owner: owner,
            listener,
        }
    }

    /// Makes the broker advertise `host:port` in metadata instead of its own listener.
    pub fn advertise(&self, host: &str, port: u16) {
        let host = CString::new(host).unwrap();
        // SAFETY: valid cluster; librdkafka copies the host.
        unsafe {
            rd::rd_kafka_mock_broker_set_host_port(self.cluster, 1, host.as_ptr(), i32::from(port))
        };
    }
}

impl Drop for AdvertisedMock {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once, before the owner client.
        unsafe { rd::rd_kafka_mock_cluster_destroy(self.cluster) };
    }
}
