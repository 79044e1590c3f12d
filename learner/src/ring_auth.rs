//! The TCP ring's handshake: each connection between neighbouring ranks proves, in both
//! directions, that the other end holds the cluster's token (docs/security.md), and names the
//! connecting rank, before any gradient crosses it. A stray or hostile connection to a rank's
//! ring port is refused and the rank keeps waiting for its real neighbour.
//!
//! Challenge-response with HMAC-SHA256 (RFC 2104) over fresh 32-byte nonces from both sides, so
//! a recorded handshake cannot be replayed. Without a token (one machine, loopback) the key is
//! empty: the handshake still checks the wiring (magic and rank) but proves nothing.
//! The gradients themselves travel in plaintext: the ring authenticates its peers but does not
//! encrypt (see docs/security.md).

use std::io::{Read, Write};

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

const MAGIC: &[u8; 8] = b"rlhfrng2";
const NONCE: usize = 32;
const TAG: usize = 32;

type HmacSha256 = Hmac<Sha256>;

fn tag(key: &[u8], label: &[u8], parts: &[&[u8]]) -> [u8; TAG] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(label);
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

fn verify(key: &[u8], label: &[u8], parts: &[&[u8]], got: &[u8]) -> bool {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(label);
    for p in parts {
        mac.update(p);
    }
    // Constant-time comparison.
    mac.verify_slice(got).is_ok()
}

fn nonce() -> [u8; NONCE] {
    let mut n = [0u8; NONCE];
    rand::rng().fill_bytes(&mut n);
    n
}

fn refused(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::PermissionDenied, what)
}

/// What a connecting rank says about itself: its rank and its ring's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub rank: u64,
    pub ring: u64,
}

/// A connection whose peer proved it holds the token, not yet answered (see [`acknowledge`]).
#[derive(Debug)]
pub struct Accepted {
    pub hello: Hello,
    ours: [u8; NONCE],
    theirs: [u8; NONCE],
}

/// The connecting side: says `hello` and checks that the other end holds the token too (it
/// answers only when it takes this connection as its neighbour; a closed connection means it
/// did not: another ring, a stale rank, or another token).
pub fn connect<S: Read + Write>(stream: &mut S, key: &[u8], hello: Hello) -> std::io::Result<()> {
    let mut challenge = [0u8; 8 + NONCE];
    stream.read_exact(&mut challenge)?;
    if &challenge[..8] != MAGIC {
        return Err(refused(
            "the next rank's port does not speak the ring protocol".into(),
        ));
    }
    let theirs = &challenge[8..];
    let ours = nonce();
    let (rank, ring) = (hello.rank.to_le_bytes(), hello.ring.to_le_bytes());
    let proof = tag(key, b"connect", &[theirs, &rank, &ring, &ours]);
    let mut reply = Vec::with_capacity(8 + 16 + NONCE + TAG);
    reply.extend_from_slice(MAGIC);
    reply.extend_from_slice(&rank);
    reply.extend_from_slice(&ring);
    reply.extend_from_slice(&ours);
    reply.extend_from_slice(&proof);
    stream.write_all(&reply)?;
    let mut answer = [0u8; TAG];
    stream.read_exact(&mut answer)?;
    if !verify(key, b"accept", &[&ours, theirs], &answer) {
        return Err(refused(
            "the next rank could not prove it holds the cluster's token".into(),
        ));
    }
    Ok(())
}

/// The accepting side, first half: the connecting rank's hello, once it proved it holds the
/// token. Nothing is answered yet: [`acknowledge`] takes the connection, dropping it refuses.
pub fn accept<S: Read + Write>(stream: &mut S, key: &[u8]) -> std::io::Result<Accepted> {
    let ours = nonce();
    let mut challenge = Vec::with_capacity(8 + NONCE);
    challenge.extend_from_slice(MAGIC);
    challenge.extend_from_slice(&ours);
    stream.write_all(&challenge)?;
    let mut reply = [0u8; 8 + 16 + NONCE + TAG];
    stream.read_exact(&mut reply)?;
    if &reply[..8] != MAGIC {
        return Err(refused(
            "a connection that does not speak the ring protocol".into(),
        ));
    }
    let (rank, ring) = (&reply[8..16], &reply[16..24]);
    let theirs: [u8; NONCE] = reply[24..24 + NONCE].try_into().expect("NONCE bytes");
    if !verify(
        key,
        b"connect",
        &[&ours, rank, ring, &theirs],
        &reply[24 + NONCE..],
    ) {
        return Err(refused(
            "a connection that could not prove it holds the cluster's token".into(),
        ));
    }
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    Ok(Accepted {
        hello: Hello {
            rank: word(rank),
            ring: word(ring),
        },
        ours,
        theirs,
    })
}

/// The accepting side, second half: proves this end holds the token too, taking the
/// connection.
pub fn acknowledge<S: Write>(
    stream: &mut S,
    key: &[u8],
    accepted: &Accepted,
) -> std::io::Result<()> {
    stream.write_all(&tag(key, b"accept", &[&accepted.theirs, &accepted.ours]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    const HELLO: Hello = Hello { rank: 3, ring: 77 };

    fn pair(
        connect_key: &'static [u8],
        accept_key: &'static [u8],
    ) -> (std::io::Result<()>, std::io::Result<Hello>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let accepted = accept(&mut s, accept_key)?;
            acknowledge(&mut s, accept_key, &accepted)?;
            Ok(accepted.hello)
        });
        let mut s = TcpStream::connect(addr).unwrap();
        let c = connect(&mut s, connect_key, HELLO);
        (c, acceptor.join().unwrap())
    }

    #[test]
    fn ranks_with_the_same_token_join_and_say_who_they_are() {
        let (c, a) = pair(b"cluster-token", b"cluster-token");
        c.unwrap();
        assert_eq!(a.unwrap(), HELLO);
        let (c, a) = pair(b"", b"");
        c.unwrap();
        assert_eq!(a.unwrap(), HELLO);
    }

    #[test]
    fn a_peer_with_another_token_is_refused_on_both_sides() {
        let (c, a) = pair(b"wrong-token", b"cluster-token");
        assert_eq!(a.unwrap_err().kind(), std::io::ErrorKind::PermissionDenied);
        assert!(c.is_err());
    }

    #[test]
    fn an_acceptor_that_does_not_hold_the_token_is_not_trusted() {
        // A listener that answers with garbage in place of the proof.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let fake = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let accepted = accept(&mut s, b"");
            assert!(accepted.is_err(), "it cannot check the connector's proof");
            let _ = s.write_all(&[0u8; TAG]);
        });
        let mut s = TcpStream::connect(addr).unwrap();
        assert!(connect(&mut s, b"cluster-token", HELLO).is_err());
        fake.join().unwrap();
    }

    #[test]
    fn a_stranger_that_speaks_something_else_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stranger = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            let mut challenge = [0u8; 8 + NONCE];
            s.read_exact(&mut challenge).unwrap();
            let _ = s.write_all(&[b'x'; 8 + 16 + NONCE + TAG]);
        });
        let (mut s, _) = listener.accept().unwrap();
        let err = accept(&mut s, b"k").unwrap_err();
        assert!(
            err.to_string().contains("does not speak the ring protocol"),
            "{err}"
        );
        stranger.join().unwrap();
    }
}
