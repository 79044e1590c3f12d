//! Gradient synchronisation between data-parallel learner ranks.
//!
//! burn 0.22's collectives work inside one process only (and panic on the CPU device), so ranks
//! in different processes or hosts need their own: on CPU, a ring all-reduce over TCP
//! ([`TcpRing`]); on GPU, NCCL (behind the `cuda` feature). Every rank ends with bit-identical
//! sums: each chunk is reduced along one fixed path and then copied to every rank.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

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

const HELLO: &[u8; 8] = b"rlhfring";

impl TcpRing {
    /// Joins the ring: listens on `peers[rank]`, connects to the next rank (retrying until
    /// `timeout`), accepts the previous one. Every later read and write times out after
    /// `io_timeout`.
    pub fn connect(
        rank: usize,
        peers: &[String],
        timeout: Duration,
        io_timeout: Duration,
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
        let next_addr = resolve(&peers[(rank + 1) % world])?;
        let deadline = Instant::now() + timeout;
        let prev_rank = (rank + world - 1) % world;
        let acceptor = std::thread::spawn(move || -> std::io::Result<TcpStream> {
            listener.set_nonblocking(true)?;
            loop {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false)?;
                        return Ok(stream);
                    }
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        return Err(std::io::Error::other(format!(
                            "rank {rank}: rank {prev_rank} did not connect within {timeout:?}"
                        )));
                    }
                    Err(e) => return Err(e),
                }
            }
        });
        let mut next = loop {
            match TcpStream::connect_timeout(&next_addr, Duration::from_secs(2)) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => {
                    return Err(std::io::Error::other(format!(
                        "rank {rank}: cannot reach rank {} at {next_addr}: {e}",
                        (rank + 1) % world
                    )));
                }
            }
        };
        let mut prev = acceptor
            .join()
            .map_err(|_| std::io::Error::other("the accepting thread panicked"))??;
        for s in [&next, &prev] {
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(io_timeout))?;
            s.set_write_timeout(Some(io_timeout))?;
        }
        // Handshake: each side names itself, so a wrong wiring fails at once.
        next.write_all(HELLO)?;
        next.write_all(&(rank as u64).to_le_bytes())?;
        let mut hello = [0u8; 16];
        prev.read_exact(&mut hello)?;
        let from = u64::from_le_bytes(hello[8..].try_into().expect("8 bytes")) as usize;
        if &hello[..8] != HELLO || from != (rank + world - 1) % world {
            return Err(std::io::Error::other(format!(
                "rank {rank}: expected rank {} on the ring, got {from}",
                (rank + world - 1) % world
            )));
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
