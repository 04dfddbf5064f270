//! What the AWS uplinks share: Signature Version 4 ([`sigv4`]) and the credential chain
//! ([`credentials`]). The Kinesis uplink signs its requests with them; a Kafka uplink with
//! `cloud = "msk-iam"` signs its IAM token ([`msk`]).

pub mod credentials;
pub mod msk;
pub mod sigv4;
