//! The rendezvous, a tiny TCP store: rank 0 listens on MASTER_PORT, every other rank connects to
//! MASTER_ADDR:MASTER_PORT and says who it is (rank, world size, job tag); rank 0 refuses
//! mismatches and, once all have joined, sends each the address of every rank's own listener, and
//! the ranks connect to each other. The resulting mesh of connections carries `broadcast` (the NCCL
//! id) and the loopback collective (loopback.rs), so a group without rank 0 has its own links.
//!
//! Wire: frames `[op u8][seq u32 LE][len u64 LE][body]`; `seq` counts the frames of one connection
//! in both directions, so a rank that skipped or repeated a call is caught. Every read and write has
//! a timeout; a peer that goes away or stays silent is an error naming its rank, never a hang.

use super::{secs, World};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Frame tags: a tag's code is its index here, its name is what errors say (the loopback function's).
const OPS: &str = "? hello welcome refuse abort rendezvous_broadcast barrier all_reduce_sum all_reduce_max broadcast \
                   all_gather reduce_scatter_sum all_to_all_v";
const HELLO: u8 = 1;
const WELCOME: u8 = 2;
const REFUSE: u8 = 3;
const ABORT: u8 = 4;

fn code(name: &str) -> u8 {
    OPS.split_whitespace().position(|n| n == name).expect("a frame tag") as u8
}

fn name(code: u8) -> &'static str {
    OPS.split_whitespace().nth(code as usize).unwrap_or("?")
}
const MAGIC: &[u8; 5] = b"pith1";

/// The joined job: one connection to every other rank.
pub struct Rendezvous {
    pub world: World,
    pub timeout: Duration,
    peers: Vec<Option<TcpStream>>,
    seq: Vec<u32>,
}

impl Rendezvous {
    /// Meet the other ranks within `timeout`. A world of one joins at once.
    pub fn join(world: &World, timeout: Duration) -> Result<Rendezvous, String> {
        let deadline = Instant::now() + timeout;
        let peers = match (world.size, world.rank) {
            (1, _) => vec![None],
            (_, 0) => join_root(world, timeout, deadline)?,
            _ => join_peer(world, timeout, deadline)?,
        };
        for s in peers.iter().flatten() {
            s.set_nodelay(true).and_then(|_| s.set_write_timeout(Some(timeout))).map_err(|e| e.to_string())?;
        }
        Ok(Rendezvous { world: world.clone(), timeout, seq: vec![0; peers.len()], peers })
    }

    /// Rank 0's `bytes` (others pass None), on every rank: how the NCCL unique id is shared.
    pub fn broadcast(&mut self, bytes: Option<&[u8]>) -> Result<Vec<u8>, String> {
        if self.world.rank != 0 {
            return self.recv(0, "rendezvous_broadcast", Instant::now() + self.timeout);
        }
        let b = bytes.ok_or("rank 0 must pass the bytes to broadcast")?;
        (1..self.world.size as usize).try_for_each(|r| self.send(r, "rendezvous_broadcast", b))?;
        Ok(b.to_vec())
    }

    /// A frame tagged `name` (an op, or "abort" with the error as body) to rank `to`.
    pub(super) fn send(&mut self, to: usize, name: &'static str, body: &[u8]) -> Result<(), String> {
        let (me, seq) = (self.world.rank, self.seq[to]);
        let s = self.peers[to].as_mut().ok_or(format!("rank {me} has no connection to rank {to}"))?;
        self.seq[to] += 1;
        write_frame(s, code(name), seq, body).map_err(|e| match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                format!("rank {to} took nothing for {} s during {name}", secs(self.timeout))
            }
            _ => format!("rank {to} left the job (connection closed) during {name}"),
        })
    }

    /// The body of the next frame from `from`, which must be tagged `op` (an abort is its error).
    pub(super) fn recv(&mut self, from: usize, op: &'static str, deadline: Instant) -> Result<Vec<u8>, String> {
        let me = self.world.rank;
        let s = self.peers[from].as_mut().ok_or(format!("rank {me} has no connection to rank {from}"))?;
        let wait = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        let (got, seq, body) = read_frame(s, wait).map_err(|e| match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                format!("rank {from} sent nothing for {} s during {op}", secs(self.timeout))
            }
            _ => format!("rank {from} left the job (connection closed) during {op}"),
        })?;
        let want = self.seq[from];
        match got {
            ABORT => Err(String::from_utf8_lossy(&body).into_owned()),
            _ if got != code(op) => Err(format!("rank {from} called {} where rank {me} called {op}", name(got))),
            _ if seq != want => Err(format!("rank {from} is at message {seq} but rank {me} at {want} ({op})")),
            _ => {
                self.seq[from] += 1;
                Ok(body)
            }
        }
    }
}

fn write_frame(s: &mut TcpStream, op: u8, seq: u32, body: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(13 + body.len());
    buf.push(op);
    buf.extend(seq.to_le_bytes());
    buf.extend((body.len() as u64).to_le_bytes());
    buf.extend(body);
    s.write_all(&buf)
}

fn read_frame(s: &mut TcpStream, wait: Duration) -> io::Result<(u8, u32, Vec<u8>)> {
    s.set_read_timeout(Some(wait))?;
    let mut head = [0u8; 13];
    s.read_exact(&mut head)?;
    let len = u64::from_le_bytes(head[5..].try_into().unwrap());
    if len > 1 << 40 {
        return Err(io::Error::new(ErrorKind::InvalidData, "not a pith frame"));
    }
    let mut body = vec![0; len as usize];
    s.read_exact(&mut body)?;
    Ok((head[0], u32::from_le_bytes(head[1..5].try_into().unwrap()), body))
}

fn hello(world: &World, rank: u32, listen_port: u16) -> Vec<u8> {
    let mut b = MAGIC.to_vec();
    b.extend(rank.to_le_bytes());
    b.extend(world.size.to_le_bytes());
    b.extend(listen_port.to_le_bytes());
    b.extend(world.job.as_bytes());
    b
}

/// (rank, size, listen port, job) of a hello frame; None for anything else (a stray connection).
fn read_hello(s: &mut TcpStream, wait: Duration) -> Option<(usize, u32, u16, String)> {
    let (op, _, b) = read_frame(s, wait).ok()?;
    if op != HELLO || b.len() < 15 || &b[..5] != MAGIC {
        return None;
    }
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
    let port = u16::from_le_bytes([b[13], b[14]]);
    Some((u32_at(5) as usize, u32_at(9), port, String::from_utf8_lossy(&b[15..]).into_owned()))
}

pub(super) fn accept_until(l: &TcpListener, deadline: Instant) -> io::Result<Option<(TcpStream, SocketAddr)>> {
    l.set_nonblocking(true)?;
    loop {
        match l.accept() {
            Ok((s, a)) => return s.set_nonblocking(false).map(|_| Some((s, a))),
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

pub(super) fn connect_until(target: &str, deadline: Instant) -> Option<TcpStream> {
    loop {
        for addr in target.to_socket_addrs().into_iter().flatten() {
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(1), Duration::from_secs(1));
            if let Ok(s) = TcpStream::connect_timeout(&addr, wait) {
                return Some(s);
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn join_root(world: &World, timeout: Duration, deadline: Instant) -> Result<Vec<Option<TcpStream>>, String> {
    let (n, port, addr) = (world.size as usize, world.master_port, &world.master_addr);
    let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| match e.kind() {
        ErrorKind::AddrInUse => {
            format!("MASTER_PORT {port} on {addr} is in use (a stale run?); pick another port or stop it")
        }
        _ => format!("rank 0: listening on port {port}: {e}"),
    })?;
    let mut peers: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let mut table = vec![String::new(); n];
    // An error that ends the job is told to every rank that joined, so all report the same line.
    let fail = |peers: &mut Vec<Option<TcpStream>>, msg: String| {
        peers.iter_mut().flatten().for_each(|s| drop(write_frame(s, REFUSE, 0, msg.as_bytes())));
        msg
    };
    while peers[1..].iter().any(Option::is_none) {
        let accepted =
            accept_until(&listener, deadline).map_err(|e| format!("rank 0: accepting on port {port}: {e}"))?;
        let Some((mut s, from)) = accepted else {
            let missing: Vec<String> = (1..n).filter(|&r| peers[r].is_none()).map(|r| r.to_string()).collect();
            let secs = secs(timeout);
            let msg =
                format!("rank(s) {} did not join the rendezvous at {addr}:{port} within {secs} s", missing.join(", "));
            return Err(fail(&mut peers, msg));
        };
        let wait =
            deadline.saturating_duration_since(Instant::now()).clamp(Duration::from_millis(1), Duration::from_secs(5));
        let Some((rank, size, lport, job)) = read_hello(&mut s, wait) else { continue };
        if job != world.job {
            let msg = format!(
                "the rendezvous at {addr}:{port} belongs to another job (job `{}`, this rank's: `{job}`); \
                 two jobs on one MASTER_PORT? pick another port",
                world.job
            );
            let _ = write_frame(&mut s, REFUSE, 0, msg.as_bytes());
            continue;
        }
        let msg = if size != world.size {
            format!("rank {rank} has world size {size} but rank 0 has {}: every rank must agree", world.size)
        } else if rank == 0 || rank >= n || peers[rank].is_some() {
            format!("two processes claim rank {rank} (check RANK / SLURM_PROCID)")
        } else {
            table[rank] = SocketAddr::new(from.ip(), lport).to_string();
            peers[rank] = Some(s);
            continue;
        };
        let _ = write_frame(&mut s, REFUSE, 0, msg.as_bytes());
        return Err(fail(&mut peers, msg));
    }
    let table = table.join("\n");
    for (r, s) in peers.iter_mut().enumerate().skip(1) {
        write_frame(s.as_mut().unwrap(), WELCOME, 0, table.as_bytes())
            .map_err(|e| format!("rank {r} left the job during the rendezvous: {e}"))?;
    }
    Ok(peers)
}

fn join_peer(world: &World, timeout: Duration, deadline: Instant) -> Result<Vec<Option<TcpStream>>, String> {
    let (r, n) = (world.rank as usize, world.size as usize);
    let listener = TcpListener::bind(("0.0.0.0", 0)).map_err(|e| format!("rank {r}: listening: {e}"))?;
    let lport = listener.local_addr().map_err(|e| e.to_string())?.port();
    let target = format!("{}:{}", world.master_addr, world.master_port);
    let secs = secs(timeout);
    let mut root = connect_until(&target, deadline).ok_or(format!(
        "rank {r}: could not reach the rendezvous at {target} within {secs} s (is rank 0 running? MASTER_ADDR/MASTER_PORT)"
    ))?;
    write_frame(&mut root, HELLO, 0, &hello(world, r as u32, lport)).map_err(|e| format!("rank {r}: {target}: {e}"))?;
    // Rank 0 answers once every rank joined; it may have started later than this rank.
    let table: Vec<String> = match read_frame(&mut root, timeout + deadline.saturating_duration_since(Instant::now())) {
        Ok((WELCOME, _, b)) => String::from_utf8_lossy(&b).split('\n').map(String::from).collect(),
        Ok((REFUSE, _, b)) => return Err(format!("rank {r}: {}", String::from_utf8_lossy(&b))),
        Ok(_) => return Err(format!("rank {r}: {target} is not a pith rendezvous")),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            return Err(format!("rank {r}: the rendezvous at {target} did not complete within {secs} s"))
        }
        Err(_) => return Err(format!("rank {r}: rank 0 closed the rendezvous at {target} before every rank joined")),
    };
    if table.len() != n {
        return Err(format!("rank {r}: {target} sent a table of {} ranks, not {n}", table.len()));
    }
    let mut peers: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    peers[0] = Some(root);
    // The mesh: connect to every lower rank, accept every higher one.
    for (j, addr) in table.iter().enumerate().take(r).skip(1) {
        let mut s = connect_until(addr, deadline).ok_or(format!("rank {r}: could not reach rank {j} at {addr}"))?;
        write_frame(&mut s, HELLO, 0, &hello(world, r as u32, 0)).map_err(|e| format!("rank {r}: rank {j}: {e}"))?;
        peers[j] = Some(s);
    }
    while peers[r + 1..].iter().any(Option::is_none) {
        let accepted = accept_until(&listener, deadline).map_err(|e| format!("rank {r}: accepting: {e}"))?;
        let Some((mut s, _)) = accepted else {
            return Err(format!("rank {r}: the ranks above it did not connect within {secs} s"));
        };
        let wait = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        match read_hello(&mut s, wait) {
            Some((j, _, _, job)) if job == world.job && j > r && j < n && peers[j].is_none() => peers[j] = Some(s),
            _ => continue,
        }
    }
    Ok(peers)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A port free a moment ago.
    pub fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    pub fn world(rank: u32, size: u32, port: u16, job: &str) -> World {
        World { rank, size, local_rank: rank, master_addr: "127.0.0.1".into(), master_port: port, job: job.into() }
    }

    /// Run `f` on every rank of a world of `size` (one thread each); results by rank.
    pub fn ranks<T: Send + 'static>(
        size: u32,
        f: impl Fn(Result<Rendezvous, String>) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let (port, f) = (free_port(), std::sync::Arc::new(f));
        let threads: Vec<_> = (0..size)
            .map(|r| {
                let f = f.clone();
                std::thread::spawn(move || f(Rendezvous::join(&world(r, size, port, "t"), Duration::from_secs(3))))
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    }

    #[test]
    fn join_and_broadcast_the_nccl_id() {
        let id: Vec<u8> = (0..128).collect();
        let got = ranks(4, move |rv| {
            let mut rv = rv.unwrap();
            let mine = (rv.world.rank == 0).then(|| (0..128).collect::<Vec<u8>>());
            rv.broadcast(mine.as_deref()).unwrap()
        });
        assert!(got.iter().all(|b| *b == id));
    }

    #[test]
    fn unreachable_busy_port_and_mismatches_are_one_line_errors() {
        let port = free_port();
        let t = Duration::from_millis(300);
        let err = Rendezvous::join(&world(1, 2, port, ""), t).err().unwrap();
        let want = format!("rank 1: could not reach the rendezvous at 127.0.0.1:{port} within 0.3 s (is rank 0 running? MASTER_ADDR/MASTER_PORT)");
        assert_eq!(err, want);

        let busy = TcpListener::bind(("0.0.0.0", 0)).unwrap();
        let port = busy.local_addr().unwrap().port();
        let err = Rendezvous::join(&world(0, 2, port, ""), t).err().unwrap();
        assert_eq!(
            err,
            format!("MASTER_PORT {port} on 127.0.0.1 is in use (a stale run?); pick another port or stop it")
        );

        // Rank 0 of job "a" meets a rank 1 of job "b" (refused; rank 0 keeps waiting), then a
        // rank 1 with another world size (the job fails on both sides).
        let port = free_port();
        let root = std::thread::spawn(move || Rendezvous::join(&world(0, 2, port, "a"), Duration::from_secs(3)).err());
        let t = Duration::from_secs(2);
        let other = Rendezvous::join(&world(1, 2, port, "b"), t).err().unwrap();
        assert!(other.starts_with("rank 1: the rendezvous at 127.0.0.1:") && other.contains("another job"), "{other}");
        let size = Rendezvous::join(&world(1, 3, port, "a"), t).err().unwrap();
        assert_eq!(size, "rank 1: rank 1 has world size 3 but rank 0 has 2: every rank must agree");
        assert_eq!(root.join().unwrap().unwrap(), "rank 1 has world size 3 but rank 0 has 2: every rank must agree");

        // Two processes claim rank 1.
        let port = free_port();
        let dup: Vec<_> = (0..3)
            .map(|i| {
                let w = world((i > 0) as u32, 3, port, "d");
                std::thread::spawn(move || Rendezvous::join(&w, Duration::from_secs(3)).err())
            })
            .collect();
        let errs: Vec<String> = dup.into_iter().map(|t| t.join().unwrap().unwrap()).collect();
        assert!(errs.iter().all(|e| e.contains("two processes claim rank 1")), "{errs:?}");
    }
}
