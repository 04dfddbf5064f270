//! A scripted HTTP/1.1 server on a free loopback port: answers each request with what a
//! handler says and records what it saw. For tests of HTTP clients (the Pub/Sub uplink's error
//! mapping, a gate in front of the emulator) without a real service.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub authorization: Option<String>,
    pub body: Vec<u8>,
}

pub type Answer = Pin<Box<dyn Future<Output = (u16, String)> + Send>>;
pub type Handler = Arc<dyn Fn(Seen) -> Answer + Send + Sync>;

#[derive(Debug)]
pub struct Scripted {
    pub addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Scripted {
    /// A server answering at once with `handler`'s answer.
    pub async fn start(
        handler: impl Fn(&Seen) -> (u16, String) + Send + Sync + 'static,
    ) -> Scripted {
        Scripted::start_async(move |req| {
            let answer = handler(&req);
            Box::pin(async move { answer })
        })
        .await
    }

    /// A server answering with the future `handler` returns.
    pub async fn start_async(handler: impl Fn(Seen) -> Answer + Send + Sync + 'static) -> Scripted {
        let handler: Handler = Arc::new(handler);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let handler = handler.clone();
                let seen = s.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 65536];
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                    let header = |name: &str| {
                        head.lines()
                            .find(|l| l.to_ascii_lowercase().starts_with(&format!("{name}:")))
                            .map(|l| l[name.len() + 1..].trim().to_owned())
                    };
                    let len: usize = header("content-length").map_or(0, |v| v.parse().unwrap());
                    while buf.len() < head_end + len {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let req = Seen {
                        path: head.split(' ').nth(1).unwrap_or("").to_owned(),
                        authorization: header("authorization"),
                        body: buf[head_end..head_end + len].to_vec(),
                    };
                    seen.lock().unwrap().push(req.clone());
                    let (code, body) = handler(req).await;
                    let resp = format!(
                        "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        Scripted { addr, seen, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}
