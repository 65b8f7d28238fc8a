//! All-reduce between processes over TCP, for CPU training (and tests of the data-parallel loop).
//! Rank 0 is the hub: it listens, publishes its address through the rendezvous folder, receives
//! every other rank's buffer, sums in rank order `0, 1, ..., world-1` and sends the sum back. The
//! sum is therefore identical on every rank and from run to run.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::Tensor;

use super::{rendezvous, AllReduce, DistError};

const MAGIC: &[u8; 4] = b"CJDP";
/// Rendezvous file holding rank 0's `host:port`.
pub const ADDR_FILE: &str = "tcp_addr";

/// A member of a TCP all-reduce group.
#[derive(Debug)]
pub struct TcpHub {
    rank: usize,
    world: usize,
    /// Rank 0: one stream per rank `1..world` (index `r - 1`); other ranks: the stream to rank 0.
    peers: Vec<TcpStream>,
}

impl TcpHub {
    /// Join the group: rank 0 listens on `bind_host` (e.g. `127.0.0.1`, or `0.0.0.0` across
    /// machines) and publishes `advertise_host:port` in `dir`; the others connect to it. Fails
    /// after `timeout` when a rank does not show up.
    pub fn connect(
        rank: usize,
        world: usize,
        dir: &Path,
        bind_host: &str,
        advertise_host: &str,
        timeout: Duration,
    ) -> Result<Self, DistError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |source| DistError::Io { rank, what, source }
        };
        if world == 0 || rank >= world {
            return Err(DistError::Protocol {
                rank,
                msg: format!("rank {rank} is outside a world of {world}"),
            });
        }
        if rank == 0 {
            let listener = TcpListener::bind((bind_host, 0)).map_err(io("listen"))?;
            let port = listener.local_addr().map_err(io("listen"))?.port();
            rendezvous::publish(
                dir,
                ADDR_FILE,
                format!("{advertise_host}:{port}").as_bytes(),
                0,
            )?;
            listener.set_nonblocking(true).map_err(io("listen"))?;
            let mut slots: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
            let t0 = Instant::now();
            while slots.iter().any(Option::is_none) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).map_err(io("accept"))?;
                        s.set_nodelay(true).map_err(io("accept"))?;
                        let mut hello = [0u8; 12];
                        s.read_exact(&mut hello).map_err(io("read hello"))?;
                        let r = u32::from_le_bytes(hello[4..8].try_into().unwrap()) as usize;
                        let w = u32::from_le_bytes(hello[8..12].try_into().unwrap()) as usize;
                        if &hello[..4] != MAGIC || w != world || r == 0 || r >= world {
                            return Err(DistError::Protocol {
                                rank,
                                msg: format!(
                                    "a peer introduced itself as rank {r} of {w} (expected 1..{world} of {world})"
                                ),
                            });
                        }
                        if slots[r - 1].replace(s).is_some() {
                            return Err(DistError::Protocol {
                                rank,
                                msg: format!("rank {r} joined twice"),
                            });
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if t0.elapsed() >= timeout {
                            let missing: Vec<String> = slots
                                .iter()
                                .enumerate()
                                .filter(|(_, s)| s.is_none())
                                .map(|(i, _)| (i + 1).to_string())
                                .collect();
                            return Err(DistError::Protocol {
                                rank,
                                msg: format!(
                                    "rank(s) {} did not join within {} s",
                                    missing.join(", "),
                                    timeout.as_secs()
                                ),
                            });
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return Err(io("accept")(e)),
                }
            }
            let peers = slots.into_iter().map(Option::unwrap).collect();
            Ok(TcpHub { rank, world, peers })
        } else {
            let addr = rendezvous::wait_for(dir, ADDR_FILE, timeout, rank)?;
            let addr = String::from_utf8_lossy(&addr).trim().to_string();
            let sock: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(&addr)
                .map_err(io(&format!("resolve {addr}")))?
                .next()
                .ok_or_else(|| DistError::Protocol {
                    rank,
                    msg: format!("rank 0's address {addr} does not resolve"),
                })?;
            let mut s = TcpStream::connect_timeout(&sock, timeout)
                .map_err(io(&format!("connect to rank 0 at {addr}")))?;
            s.set_nodelay(true).map_err(io("connect"))?;
            let mut hello = Vec::with_capacity(12);
            hello.extend_from_slice(MAGIC);
            hello.extend_from_slice(&(rank as u32).to_le_bytes());
            hello.extend_from_slice(&(world as u32).to_le_bytes());
            s.write_all(&hello).map_err(io("send hello"))?;
            Ok(TcpHub {
                rank,
                world,
                peers: vec![s],
            })
        }
    }

    /// Sum `v` over the ranks (in place), rank 0 adding in rank order.
    pub fn all_reduce_sum_vec(&mut self, v: &mut [f32]) -> Result<(), DistError> {
        let rank = self.rank;
        if self.world == 1 {
            return Ok(());
        }
        if rank == 0 {
            let mut buf = Vec::new();
            for (i, s) in self.peers.iter_mut().enumerate() {
                let from = i + 1;
                recv(s, &mut buf, rank, from)?;
                if buf.len() != v.len() * 4 {
                    return Err(DistError::Protocol {
                        rank,
                        msg: format!(
                            "rank {from} sent {} values, rank 0 has {}: the ranks disagree on \
                             the gradient buffer (same model and config on every rank?)",
                            buf.len() / 4,
                            v.len()
                        ),
                    });
                }
                for (a, b) in v.iter_mut().zip(buf.chunks_exact(4)) {
                    *a += f32::from_le_bytes(b.try_into().unwrap());
                }
            }
            let out = to_bytes(v);
            for (i, s) in self.peers.iter_mut().enumerate() {
                send(s, &out, rank, i + 1)?;
            }
        } else {
            let s = &mut self.peers[0];
            send(s, &to_bytes(v), rank, 0)?;
            let mut buf = Vec::new();
            recv(s, &mut buf, rank, 0)?;
            if buf.len() != v.len() * 4 {
                return Err(DistError::Protocol {
                    rank,
                    msg: format!(
                        "rank 0 returned {} values for {} sent",
                        buf.len() / 4,
                        v.len()
                    ),
                });
            }
            for (a, b) in v.iter_mut().zip(buf.chunks_exact(4)) {
                *a = f32::from_le_bytes(b.try_into().unwrap());
            }
        }
        Ok(())
    }
}

impl AllReduce for TcpHub {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&mut self, flat: &Tensor) -> Result<Tensor, DistError> {
        let mut v = flat.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        self.all_reduce_sum_vec(&mut v)?;
        Ok(Tensor::from_vec(v, flat.elem_count(), flat.device())?)
    }
}

fn to_bytes(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn send(s: &mut TcpStream, bytes: &[u8], rank: usize, to: usize) -> Result<(), DistError> {
    let io = |source| DistError::Io {
        rank,
        what: format!("send to rank {to} (did it stop? see its log)"),
        source,
    };
    s.write_all(&(bytes.len() as u64).to_le_bytes())
        .map_err(io)?;
    s.write_all(bytes).map_err(io)
}

fn recv(s: &mut TcpStream, buf: &mut Vec<u8>, rank: usize, from: usize) -> Result<(), DistError> {
    let io = |source| DistError::Io {
        rank,
        what: format!("receive from rank {from} (did it stop? see its log)"),
        source,
    };
    let mut n = [0u8; 8];
    s.read_exact(&mut n).map_err(io)?;
    let n = u64::from_le_bytes(n) as usize;
    buf.clear();
    buf.resize(n, 0);
    s.read_exact(buf).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(world: usize, dir: &Path) -> Vec<std::thread::JoinHandle<Result<TcpHub, DistError>>> {
        (0..world)
            .map(|r| {
                let dir = dir.to_path_buf();
                std::thread::spawn(move || {
                    TcpHub::connect(
                        r,
                        world,
                        &dir,
                        "127.0.0.1",
                        "127.0.0.1",
                        Duration::from_secs(20),
                    )
                })
            })
            .collect()
    }

    /// `f(rank, hub)` on every rank of a group of `world`, each in its own thread, in rank order.
    fn on_each_rank<T: Send + 'static>(
        world: usize,
        f: impl Fn(usize, TcpHub) -> T + Send + Copy + 'static,
    ) -> Vec<T> {
        let d = tempfile::tempdir().unwrap();
        let handles: Vec<_> = group(world, d.path())
            .into_iter()
            .enumerate()
            .map(|(r, h)| std::thread::spawn(move || f(r, h.join().unwrap().unwrap())))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn three_ranks_sum_in_rank_order_and_agree_bitwise() {
        let res = on_each_rank(3, |r, mut hub| {
            assert_eq!((hub.rank(), hub.world()), (r, 3));
            // values whose sum depends on the order of addition in f32
            let mut v = vec![[1e8f32, 1.0, -1e8][r], r as f32];
            hub.all_reduce_sum_vec(&mut v).unwrap();
            let t = Tensor::new(&[r as f32 + 1.0], &candle_core::Device::Cpu).unwrap();
            let s = hub.all_reduce_sum(&t).unwrap().to_vec1::<f32>().unwrap();
            (v, s)
        });
        // ((1e8 + 1) + -1e8) in f32 = 0: rank order, not any other
        let expect = ((1e8f32 + 1.0) + -1e8, 3.0);
        for (v, s) in &res {
            assert_eq!(v[0].to_bits(), expect.0.to_bits());
            assert_eq!(v[1], expect.1);
            assert_eq!(s, &vec![6.0]);
        }
    }

    #[test]
    fn mismatched_lengths_are_an_error_naming_the_rank() {
        let res = on_each_rank(2, |r, mut hub| {
            let mut v = vec![1.0f32; 2 + r];
            hub.all_reduce_sum_vec(&mut v).map_err(|e| e.to_string())
        });
        let e = res[0].clone().unwrap_err();
        assert!(e.contains("rank 1 sent 3 values, rank 0 has 2"), "{e}");
        assert!(res[1].is_err(), "rank 1 sees the hub hang up");
    }

    #[test]
    fn a_missing_rank_times_out() {
        let d = tempfile::tempdir().unwrap();
        let e = TcpHub::connect(
            0,
            2,
            d.path(),
            "127.0.0.1",
            "127.0.0.1",
            Duration::from_millis(100),
        )
        .unwrap_err();
        assert!(e.to_string().contains("rank(s) 1 did not join"), "{e}");
    }
}
