//! The accept loops: plain TCP (`"mqtt"`) and TLS (`"mqtts"`), `max_connections`, shutdown.

use super::session::{self, Ctx};
use super::stats::reason;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How many connections beyond `max_connections` may wait at once for their refusal CONNACK;
/// more are closed at once.
const REFUSERS: usize = 16;

/// Why a listener could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListenError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// One bound MQTT listener (plain or TLS). All listeners of a gateway share one [`Ctx`], so
/// `max_connections` and client-id takeover span both.
pub struct MqttListener {
    name: &'static str,
    listener: TcpListener,
    addr: SocketAddr,
    tls: Option<(TlsAcceptor, bool)>,
    ctx: Arc<Ctx>,
    grace: Duration,
    slots: Arc<Semaphore>,
}

impl std::fmt::Debug for MqttListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttListener")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl MqttListener {
    /// Binds `addr`. With `tls`, connections are TLS; the flag says whether the client
    /// certificate's CN is the device id.
    pub async fn bind(
        name: &'static str,
        addr: SocketAddr,
        tls: Option<(TlsAcceptor, bool)>,
        ctx: Arc<Ctx>,
        grace: Duration,
    ) -> Result<MqttListener, ListenError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ListenError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ListenError::Bind { addr, source })?;
        let slots = ctx.slots.clone();
        Ok(MqttListener {
            name,
            listener,
            addr,
            tls,
            ctx,
            grace,
            slots,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Accepts connections until `shutdown` resolves, then stops accepting, lets every session
    /// finish the acks it owes and send v5 DISCONNECT 0x8B, within the grace period.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        let refusers = Arc::new(Semaphore::new(REFUSERS));
        let connect_timeout = Duration::from_millis(self.ctx.settings.connect_timeout_ms);
        tracing::info!(listener = self.name, addr = %self.addr, "The MQTT listener is accepting connections.");
        tokio::pin!(shutdown);
        loop {
            let (sock, peer) = tokio::select! {
                _ = &mut shutdown => break,
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(listener = self.name, error = %e, "Accepting an MQTT connection failed; retrying in 100 ms.");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = sock.set_nodelay(true);
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                self.ctx.stats.rejected(reason::MAX_CONNECTIONS, 1);
                tracing::warn!(listener = self.name, peer = %peer, max_connections = self.ctx.settings.max_connections,
                    "An MQTT connection was refused: max_connections is reached.");
                if let Ok(p) = refusers.clone().try_acquire_owned() {
                    let wait = connect_timeout.min(Duration::from_secs(2));
                    let tls = self.tls.as_ref().map(|t| t.0.clone());
                    tracker.spawn(async move {
                        let _p = p;
                        match tls {
                            None => session::refuse_busy(sock, wait).await,
                            Some(acc) => {
                                if let Ok(Ok(s)) =
                                    tokio::time::timeout(wait, acc.accept(sock)).await
                                {
                                    session::refuse_busy(s, wait).await;
                                }
                            }
                        }
                    });
                }
                continue;
            };
            let ctx = self.ctx.clone();
            let stop = stop.clone();
            let tls = self.tls.clone();
            let name = self.name;
            tracker.spawn(async move {
                let _permit = permit;
                let deadline = Instant::now() + connect_timeout;
                match tls {
                    None => session::serve(ctx, sock, peer, None, deadline, stop).await,
                    // Boxed, so that a plain connection's task does not reserve room for a
                    // TLS session's state as well (a task is as large as its largest branch).
                    Some((acc, want_cn)) => {
                        Box::pin(serve_tls(
                            ctx, acc, want_cn, sock, peer, deadline, stop, name,
                        ))
                        .await
                    }
                }
            });
        }
        drop(self.listener);
        tracing::info!(
            listener = self.name,
            open = tracker.len(),
            "The MQTT listener stopped accepting; sessions finish their acks."
        );
        stop.cancel();
        tracker.close();
        if tokio::time::timeout(self.grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                listener = self.name,
                open = tracker.len(),
                "MQTT sessions did not finish within the grace period."
            );
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_tls(
    ctx: Arc<Ctx>,
    acc: TlsAcceptor,
    want_cn: bool,
    sock: TcpStream,
    peer: SocketAddr,
    deadline: Instant,
    stop: CancellationToken,
    name: &'static str,
) {
    let tls = match tokio::time::timeout_at(deadline, acc.accept(sock)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            ctx.stats.rejected(reason::TLS, 1);
            tracing::info!(listener = name, peer = %peer, error = %e, "A TLS handshake failed; the connection is closed.");
            return;
        }
        Err(_) => {
            ctx.stats.rejected(reason::CONNECT_TIMEOUT, 1);
            tracing::info!(listener = name, peer = %peer, "A TLS handshake did not finish within connect_timeout_ms.");
            return;
        }
    };
    let cn = if want_cn {
        let cn = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| super::tls::common_name(c.as_ref()));
        Some(cn.unwrap_or_default())
    } else {
        None
    };
    session::serve(ctx, tls, peer, cn, deadline, stop).await;
}
