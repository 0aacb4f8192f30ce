//! A TCP proxy on loopback that counts the bytes clients send through it, and can pass them on no faster than a
//! slow link would.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A running proxy.
pub struct Proxy {
    pub port: u16,
    /// Bytes clients sent through it so far.
    pub sent: Arc<AtomicU64>,
}

impl Proxy {
    /// A proxy to `127.0.0.1:port`, passing on what clients send at most `per_second` (none: as it comes).
    pub async fn start(port: u16, per_second: Option<u64>) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Proxy { port: listener.local_addr().unwrap().port(), sent: Arc::default() };
        let counter = proxy.sent.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let back = tokio::spawn(async move { tokio::io::copy(&mut server_read, &mut client_write).await });
                    let mut buffer = vec![0u8; 64 << 10];
                    while let Ok(n) = client_read.read(&mut buffer).await {
                        if n == 0 || server_write.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                        if let Some(rate) = per_second {
                            tokio::time::sleep(std::time::Duration::from_secs_f64(n as f64 / rate as f64)).await;
                        }
                    }
                    let _ = server_write.shutdown().await;
                    let _ = back.await;
                });
            }
        });
        proxy
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}
