//! An in-process TCP proxy that can cut every connection through it and refuse new ones,
//! to simulate a database or broker outage without touching the shared servers; mute
//! what the server sends on the open connections; and be pointed at another server
//! (what HAProxy in front of a database does on failover).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    target: Arc<Mutex<SocketAddr>>,
    cut_tx: watch::Sender<u64>,
    /// Bumped by [`Proxy::mute_replies`]: connections accepted before stop carrying
    /// the server's bytes.
    muted: Arc<AtomicU64>,
    /// Milliseconds every chunk the server sends waits before it is passed on.
    delay_ms: Arc<AtomicU64>,
    /// Connections accepted (and passed on) so far.
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy to `target` on a free loopback port.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let (cut_tx, cut_rx) = watch::channel(0u64);
        let target = Arc::new(Mutex::new(target));
        let target2 = target.clone();
        let up2 = up.clone();
        let muted = Arc::new(AtomicU64::new(0));
        let muted2 = muted.clone();
        let delay_ms = Arc::new(AtomicU64::new(0));
        let delay2 = delay_ms.clone();
        let accepted = Arc::new(AtomicU64::new(0));
        let accepted2 = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if !up2.load(Ordering::SeqCst) {
                    drop(client); // refused while down
                    continue;
                }
                let mut cut = cut_rx.clone();
                // Only cuts after this connection was accepted concern it.
                cut.borrow_and_update();
                let target = *target2.lock().unwrap();
                accepted2.fetch_add(1, Ordering::SeqCst);
                let muted = muted2.clone();
                let delay_ms = delay2.clone();
                let accepted_at = muted.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    // What the server sends is read as it comes, stamped, and passed
                    // on by a writer once its delay from that stamp has passed: each
                    // chunk is late by the delay, never by the ones queued before it.
                    let (tx, mut rx) =
                        tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
                    let read_replies = async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = sr.read(&mut buf).await?;
                            if n == 0
                                || tx
                                    .send((tokio::time::Instant::now(), buf[..n].to_vec()))
                                    .is_err()
                            {
                                return Ok::<_, std::io::Error>(());
                            }
                        }
                    };
                    let write_replies = async move {
                        while let Some((read_at, bytes)) = rx.recv().await {
                            let delay = delay_ms.load(Ordering::SeqCst);
                            tokio::time::sleep_until(
                                read_at + std::time::Duration::from_millis(delay),
                            )
                            .await;
                            if muted.load(Ordering::SeqCst) == accepted_at {
                                cw.write_all(&bytes).await?;
                            }
                        }
                        Ok::<_, std::io::Error>(())
                    };
                    tokio::select! {
                        _ = tokio::io::copy(&mut cr, &mut sw) => {}
                        _ = async { tokio::join!(read_replies, write_replies) } => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self {
            addr,
            up,
            target,
            cut_tx,
            muted,
            delay_ms,
            accepted,
            task,
        }
    }

    /// Drops every open connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cut_tx.send_modify(|n| *n += 1);
    }

    /// Keeps every open connection open but drops what the server sends on it from now
    /// on (a path that lost one direction without breaking); new connections work.
    pub fn mute_replies(&self) {
        self.muted.fetch_add(1, Ordering::SeqCst);
    }

    /// Holds everything the server sends, on every connection, for `delay` before
    /// passing it on (a slow broker that still answers).
    pub fn delay_replies(&self, delay: std::time::Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// How many connections the proxy has accepted and passed on.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// Sends new connections to `to` and drops the open ones (which went elsewhere).
    pub fn retarget(&self, to: SocketAddr) {
        *self.target.lock().unwrap() = to;
        self.cut_tx.send_modify(|n| *n += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
