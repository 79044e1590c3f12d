//! Gradient synchronisation between data-parallel learner ranks.
//!
//! burn 0.22's collectives work inside one process only (and panic on the CPU device), so ranks
//! in different processes or hosts need their own: on CPU, a ring all-reduce over TCP
//! ([`TcpRing`]); on GPU, NCCL (behind the `cuda` feature). Every rank ends with bit-identical
//! sums: each chunk is reduced along one fixed path and then copied to every rank.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::ring_auth;

/// Sums buffers across ranks.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Replaces `buf` on every rank by the element-wise sum over ranks.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> std::io::Result<()>;
}

/// A single rank: nothing to synchronise.
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> std::io::Result<()> {
        Ok(())
    }
}

/// Ranks in a ring over TCP: rank r sends to r+1 and receives from r-1.
pub struct TcpRing {
    rank: usize,
    world: usize,
    next: TcpStream,
    prev: TcpStream,
}

/// How long one handshake ([`ring_auth`]: challenge, proof, answer) may take.
const HANDSHAKE: Duration = Duration::from_secs(5);

/// Identifies a ring by its layout (FNV-1a over the peer addresses): a rank left over from an
/// earlier launch whose ring had another layout (a rank since moved to another host) is
/// refused, rather than joined and then lost when it is killed.
fn ring_id(peers: &[String]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in peers.join("\n").bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Connects to the next rank: the authenticated hello ([`ring_auth::connect`]), answered only
/// when the next rank takes the connection. Retried until `deadline` when the connection fails
/// or closes unanswered: across hosts the port may still belong to the previous launch's rank,
/// which is being killed, or to a rank of another ring (or another token), which refuses us.
fn connect_next(
    rank: usize,
    next: usize,
    addr: SocketAddr,
    ring: u64,
    key: &[u8],
    deadline: Instant,
) -> std::io::Result<TcpStream> {
    let hello = ring_auth::Hello {
        rank: rank as u64,
        ring,
    };
    loop {
        let attempt = (|| {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(HANDSHAKE))?;
            s.set_write_timeout(Some(HANDSHAKE))?;
            ring_auth::connect(&mut s, key, hello)?;
            Ok::<_, std::io::Error>(s)
        })();
        match attempt {
            Ok(s) => return Ok(s),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                return Err(std::io::Error::other(format!(
                    "rank {rank}: cannot reach rank {next} at {addr}: {e}"
                )));
            }
        }
    }
}

/// Accepts the previous rank: the first connection that proves it holds the cluster's token
/// and whose hello names that rank of this ring, answered. Connections that close during the
/// handshake, cannot prove the token, or come from another ring are dropped and the next one
/// is awaited, until `deadline`.
fn accept_prev(
    listener: TcpListener,
    rank: usize,
    prev: usize,
    ring: u64,
    key: Vec<u8>,
    deadline: Instant,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let mut refused = String::new();
    loop {
        match listener.accept() {
            Ok((mut s, peer)) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(HANDSHAKE))?;
                s.set_write_timeout(Some(HANDSHAKE))?;
                let accepted = match ring_auth::accept(&mut s, &key) {
                    Ok(a) => a,
                    Err(e) => {
                        // Gone during the handshake, not a rank, or another token.
                        if e.kind() == std::io::ErrorKind::PermissionDenied {
                            tracing::warn!(%peer, "ring port: {e}");
                            refused = format!("; refused {peer}: {e}");
                        }
                        continue;
                    }
                };
                let from = accepted.hello.rank as usize;
                if accepted.hello.ring != ring {
                    refused = format!("; refused rank {from} of another ring (other peers)");
                    continue;
                }
                if from != prev {
                    // The same ring, wired wrong: no retry will mend it.
                    return Err(std::io::Error::other(format!(
                        "rank {rank}: expected rank {prev} on the ring, got {from}"
                    )));
                }
                if ring_auth::acknowledge(&mut s, &key, &accepted).is_ok() {
                    return Ok(s);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(std::io::Error::other(format!(
                    "rank {rank}: rank {prev} did not connect within {timeout:?}{refused}"
                )));
            }
            Err(e) => return Err(e),
        }
    }
}

impl TcpRing {
    /// Joins the ring: listens on `peers[rank]`, connects to the next rank and accepts the
    /// previous one, each side retried until `timeout` (a neighbour that goes away during the
    /// handshake, belongs to another ring or cannot prove it holds this process's token, is not
    /// taken for this ring's). Every later read and write times out after `io_timeout`. The
    /// handshake's key is the process's bearer token (`RLHF_TOKEN[_FILE]`, the cluster's join
    /// token; empty on one machine without one).
    pub fn connect(
        rank: usize,
        peers: &[String],
        timeout: Duration,
        io_timeout: Duration,
    ) -> std::io::Result<TcpRing> {
        let security = rlhf_proto::security::current();
        let key = security.token.as_deref().unwrap_or("");
        // The ring carries gradients into the model: beyond loopback only peers that prove
        // they hold the cluster's token may join, as for every gRPC endpoint.
        if key.is_empty()
            && !security.insecure
            && let Some(own) = peers.get(rank)
            && let Some(addr) = own.to_socket_addrs()?.next()
            && !addr.ip().is_loopback()
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "refusing to run the learner ring on {addr} (beyond loopback) without the cluster's token: \
                     set RLHF_TOKEN or RLHF_TOKEN_FILE (docs/security.md), or start with --insecure"
                ),
            ));
        }
        Self::connect_with_key(rank, peers, timeout, io_timeout, key.as_bytes())
    }

    /// [`TcpRing::connect`] with the handshake's key given.
    pub fn connect_with_key(
        rank: usize,
        peers: &[String],
        timeout: Duration,
        io_timeout: Duration,
        key: &[u8],
    ) -> std::io::Result<TcpRing> {
        let world = peers.len();
        if world < 2 || rank >= world {
            return Err(std::io::Error::other(format!(
                "rank {rank} of {world} peers: a ring needs at least 2 ranks"
            )));
        }
        let resolve = |a: &str| -> std::io::Result<SocketAddr> {
            a.to_socket_addrs()?
                .next()
                .ok_or_else(|| std::io::Error::other(format!("cannot resolve `{a}`")))
        };
        let listener = TcpListener::bind(resolve(&peers[rank])?)?;
        let (next_rank, prev_rank) = ((rank + 1) % world, (rank + world - 1) % world);
        let next_addr = resolve(&peers[next_rank])?;
        let ring = ring_id(peers);
        let deadline = Instant::now() + timeout;
        let accept_key = key.to_vec();
        let acceptor = std::thread::spawn(move || {
            accept_prev(
                listener, rank, prev_rank, ring, accept_key, deadline, timeout,
            )
        });
        let next = connect_next(rank, next_rank, next_addr, ring, key, deadline);
        // Joined even when `next` failed (at the deadline, when the acceptor ends too), so the
        // port is free again when this returns.
        let prev = acceptor
            .join()
            .map_err(|_| std::io::Error::other("the accepting thread panicked"))?;
        let (next, prev) = match (next, prev) {
            (Ok(n), Ok(p)) => (n, p),
            (Err(e), Ok(_)) | (Ok(_), Err(e)) => return Err(e),
            // Both say something (e.g. a refused neighbour on one side, a timeout on the other).
            (Err(n), Err(p)) => return Err(std::io::Error::other(format!("{n}; {p}"))),
        };
        for s in [&next, &prev] {
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(io_timeout))?;
            s.set_write_timeout(Some(io_timeout))?;
        }
        Ok(TcpRing {
            rank,
            world,
            next,
            prev,
        })
    }

    /// Sends `out` to the next rank while receiving as many floats from the previous one.
    fn exchange(&mut self, out: &[f32], incoming: &mut [f32]) -> std::io::Result<()> {
        let next = &mut self.next;
        let prev = &mut self.prev;
        std::thread::scope(|scope| {
            let sender = scope.spawn(move || next.write_all(bytemuck_f32(out)));
            let received = prev.read_exact(bytemuck_f32_mut(incoming));
            let sent = sender
                .join()
                .map_err(|_| std::io::Error::other("the sending thread panicked"))?;
            sent.and(received)
        })
    }
}

fn bytemuck_f32(x: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern is a valid u8; the length is exact.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}

fn bytemuck_f32_mut(x: &mut [f32]) -> &mut [u8] {
    // SAFETY: as above; every byte pattern is a valid f32 bit pattern.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}

/// `[start, end)` of chunk `c` when `n` values are cut into `world` nearly equal chunks.
fn chunk_range(n: usize, world: usize, c: usize) -> (usize, usize) {
    let base = n / world;
    let extra = n % world;
    let start = c * base + c.min(extra);
    (start, start + base + usize::from(c < extra))
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    /// Reduce-scatter then all-gather around the ring (Patarasuk & Yuan 2009): each rank sends
    /// and receives 2·(W−1)/W of the buffer.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> std::io::Result<()> {
        let (w, r, n) = (self.world, self.rank, buf.len());
        let longest = n.div_ceil(w);
        let mut incoming = vec![0.0f32; longest];
        // Reduce-scatter: after W−1 steps rank r holds the full sum of chunk (r + 1) mod W.
        for s in 0..w - 1 {
            let send = (r + w - s) % w;
            let recv = (r + w - s - 1) % w;
            let (a, b) = chunk_range(n, w, send);
            let (c, d) = chunk_range(n, w, recv);
            let out = buf[a..b].to_vec();
            self.exchange(&out, &mut incoming[..d - c])?;
            for (x, y) in buf[c..d].iter_mut().zip(&incoming[..d - c]) {
                *x += *y;
            }
        }
        // All-gather: pass the finished chunks around.
        for s in 0..w - 1 {
            let send = (r + 1 + w - s) % w;
            let recv = (r + w - s) % w;
            let (a, b) = chunk_range(n, w, send);
            let (c, d) = chunk_range(n, w, recv);
            let out = buf[a..b].to_vec();
            self.exchange(&out, &mut incoming[..d - c])?;
            buf[c..d].copy_from_slice(&incoming[..d - c]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_ports(n: usize) -> Vec<String> {
        let listeners: Vec<TcpListener> = (0..n)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        listeners
            .iter()
            .map(|l| l.local_addr().unwrap().to_string())
            .collect()
    }

    #[test]
    fn chunks_cover_the_buffer() {
        let ranges: Vec<(usize, usize)> = (0..3).map(|c| chunk_range(10, 3, c)).collect();
        assert_eq!(ranges, vec![(0, 4), (4, 7), (7, 10)]);
        assert_eq!(chunk_range(2, 3, 2), (2, 2));
    }

    #[test]
    fn three_ranks_sum_identically() {
        let peers = free_ports(3);
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let peers = peers.clone();
                std::thread::spawn(move || {
                    let mut ring = TcpRing::connect(
                        rank,
                        &peers,
                        Duration::from_secs(10),
                        Duration::from_secs(10),
                    )
                    .unwrap();
                    let mut buf: Vec<f32> = (0..1001)
                        .map(|i| (i as f32 * 0.37 + rank as f32).sin())
                        .collect();
                    ring.all_reduce_sum(&mut buf).unwrap();
                    let mut tiny = vec![rank as f32 + 1.0];
                    ring.all_reduce_sum(&mut tiny).unwrap();
                    (buf, tiny)
                })
            })
            .collect();
        let results: Vec<(Vec<f32>, Vec<f32>)> =
            handles.into_iter().map(|h| h.join().unwrap()).collect();
        let expected: Vec<f32> = (0..1001)
            .map(|i| (0..3).map(|r| (i as f32 * 0.37 + r as f32).sin()).sum())
            .collect();
        for (buf, tiny) in &results {
            assert_eq!(tiny, &vec![6.0]);
            for (a, b) in buf.iter().zip(&expected) {
                assert!((a - b).abs() < 1e-5);
            }
        }
        let bits = |v: &Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&results[0].0), bits(&results[1].0));
        assert_eq!(bits(&results[1].0), bits(&results[2].0));
    }

    /// Ranks 0 and 1 of a ring on `peers` sum `[1.0]` and `[2.0]`: both must get 3.
    fn sum_on_ring(peers: &[String], start_rank_1: impl FnOnce() + Send + 'static) {
        let p = peers.to_vec();
        let zero = std::thread::spawn(move || {
            let mut ring =
                TcpRing::connect(0, &p, Duration::from_secs(10), Duration::from_secs(5))?;
            let mut buf = vec![1.0f32];
            ring.all_reduce_sum(&mut buf)?;
            std::io::Result::Ok(buf)
        });
        start_rank_1();
        let mut ring =
            TcpRing::connect(1, peers, Duration::from_secs(10), Duration::from_secs(5)).unwrap();
        let mut buf = vec![2.0f32];
        let one = ring.all_reduce_sum(&mut buf).map(|()| buf);
        let zero = zero.join().unwrap();
        assert_eq!(zero.unwrap(), [3.0], "rank 0");
        assert_eq!(one.unwrap(), [3.0], "rank 1");
    }

    #[test]
    fn a_stale_rank_that_dies_during_the_handshake_is_not_taken_for_the_new_one() {
        // Rank 1's port is first held by its previous launch, which accepts a connection and is
        // killed (the connection closes); the new rank 1 binds the port after it.
        let peers = free_ports(2);
        let addr = peers[1].clone();
        sum_on_ring(&peers, move || {
            let stale = TcpListener::bind(&addr).unwrap();
            let (conn, _) = stale.accept().unwrap();
            std::thread::sleep(Duration::from_millis(100));
            drop((conn, stale));
        });
    }

    #[test]
    fn a_rank_of_a_ring_with_other_peers_is_refused() {
        // Rank 1 of an earlier layout (rank 0 elsewhere since) still listens on rank 1's port
        // and hellos as rank 1; it gives up, and the new rank 1 joins.
        let peers = free_ports(2);
        let old_layout = vec![free_ports(1).remove(0), peers[1].clone()];
        sum_on_ring(&peers, move || {
            let stale = TcpRing::connect(
                1,
                &old_layout,
                Duration::from_millis(700),
                Duration::from_secs(1),
            );
            assert!(stale.is_err(), "the old layout cannot form a ring");
        });
    }

    #[test]
    fn ranks_holding_different_tokens_do_not_form_a_ring() {
        let peers = free_ports(2);
        let p = peers.clone();
        let other = std::thread::spawn(move || {
            TcpRing::connect_with_key(1, &p, Duration::from_secs(2), Duration::from_secs(1), b"b")
                .err()
        });
        let err = TcpRing::connect_with_key(
            0,
            &peers,
            Duration::from_secs(2),
            Duration::from_secs(1),
            b"a",
        )
        .err()
        .expect("rank 0 joined a rank with another token");
        assert!(err.to_string().contains("cluster's token"), "{err}");
        assert!(other.join().unwrap().is_some(), "rank 1 joined");
    }

    #[test]
    fn a_missing_peer_times_out_with_a_clear_error() {
        let peers = free_ports(2);
        let err = TcpRing::connect(
            0,
            &peers,
            Duration::from_millis(300),
            Duration::from_secs(1),
        )
        .err()
        .unwrap();
        assert!(
            err.to_string().contains("cannot reach rank 1")
                || err.kind() == std::io::ErrorKind::WouldBlock,
            "{err}"
        );
    }
}
