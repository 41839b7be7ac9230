//! A real member (QUIC on loopback, credentials on disk) fed hostile peers: no
//! certificate, a certificate for another member, garbage frames, undecodable raft
//! messages, messages for someone else, a wrong join secret. Each connection is closed
//! and counted; the member keeps committing and its membership is unchanged.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use brink_control::member::{self, Start};
use brink_control::peers::pki::{self, MemberPki};
use brink_control::peers::transport;
use brink_control::settings::{MemberSettings, ReplicaSettings, TransportSettings};
use brink_control::store::{Applied, Command, Op};
use brink_proto::peer::{Frame, encode_frame};
use protobuf::Message as _;

fn free_udp() -> std::net::SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    socket.local_addr().expect("addr")
}

fn quic_client(config: rustls::ClientConfig) -> quinn::ClientConfig {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(config).expect("quic crypto");
    quinn::ClientConfig::new(Arc::new(crypto))
}

/// Opens a connection with `config`, sends `bytes` on a new unidirectional stream, and
/// waits for the member to close the connection.
async fn send_and_expect_close(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    to: std::net::SocketAddr,
    bytes: Vec<u8>,
) -> String {
    let conn = endpoint
        .connect_with(config, to, pki::MEMBER_SERVER_NAME)
        .expect("connect")
        .await
        .expect("handshake");
    let mut send = conn.open_uni().await.expect("stream");
    let _ = send.write_all(&bytes).await;
    let _ = send.finish();
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("the member closes a hostile connection");
    closed.to_string()
}

fn raft_message(from: u64, to: u64) -> Vec<u8> {
    let mut m = raft::prelude::Message {
        from,
        to,
        ..Default::default()
    };
    m.set_msg_type(raft::prelude::MessageType::MsgHeartbeat);
    m.write_to_bytes().expect("encode")
}

fn snapshot_message(from: u64, to: u64, index: u64) -> Vec<u8> {
    let mut m = raft::prelude::Message {
        from,
        to,
        term: 1,
        ..Default::default()
    };
    m.set_msg_type(raft::prelude::MessageType::MsgSnapshot);
    let meta = m.mut_snapshot().mut_metadata();
    meta.index = index;
    meta.term = 1;
    meta.mut_conf_state().voters = vec![1, 99];
    m.write_to_bytes().expect("encode")
}

/// A snapshot stream: Hello, SnapshotBegin, the chunks, SnapshotEnd with `digest` (the
/// chunks' own SHA-256 when `None`).
fn snapshot_stream(
    hello: Vec<u8>,
    message: Vec<u8>,
    size: u64,
    chunks: &[&[u8]],
    digest: Option<[u8; 32]>,
) -> Vec<u8> {
    use sha2::Digest as _;
    let mut out = hello;
    out.extend(encode_frame(&Frame::SnapshotBegin { message, size }));
    let mut hash = sha2::Sha256::new();
    for chunk in chunks {
        hash.update(chunk);
        out.extend(encode_frame(&Frame::SnapshotChunk {
            bytes: chunk.to_vec(),
        }));
    }
    let sha256 = digest.unwrap_or_else(|| hash.finalize().into());
    out.extend(encode_frame(&Frame::SnapshotEnd { sha256 }));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let peer = free_udp();
    let running = member::start(
        MemberSettings {
            data_dir: dir.path().to_path_buf(),
            peer_listen: peer,
            advertise: peer.to_string(),
            replica: ReplicaSettings {
                tick: Duration::from_millis(10),
                ..ReplicaSettings::default()
            },
            transport: TransportSettings::default(),
        },
        Start::Init,
    )
    .await
    .expect("start");
    let creds = MemberPki::read(dir.path()).expect("credentials");
    // A credential for member 99, properly issued by the site CA.
    let other = MemberPki {
        member: creds.ca.issue_member(99).expect("issue"),
        ..creds.clone()
    };
    let authenticated = || quic_client(other.client_config().expect("client config"));
    let anonymous = || quic_client(pki::join_client_config(&creds.token).expect("join config"));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("endpoint");
    let hello = |from| {
        encode_frame(&Frame::Hello {
            from,
            peer_addr: "127.0.0.1:9".into(),
        })
    };
    let refused = || {
        running
            .transport
            .metrics
            .frames_refused
            .load(Ordering::Relaxed)
    };

    let cases: Vec<(&str, quinn::ClientConfig, Vec<u8>)> = vec![
        ("raft traffic without a certificate", anonymous(), hello(99)),
        (
            "a certificate for 99 claiming to be 7",
            authenticated(),
            hello(7),
        ),
        (
            "no Hello first",
            authenticated(),
            encode_frame(&Frame::Raft { messages: vec![] }),
        ),
        (
            "garbage after Hello",
            authenticated(),
            [hello(99), vec![0, 0, 0, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9]].concat(),
        ),
        (
            "a length past the limit",
            authenticated(),
            [hello(99), vec![0xff; 4]].concat(),
        ),
        (
            "another protocol version",
            authenticated(),
            [hello(99), vec![0, 0, 0, 2, 9, 2]].concat(),
        ),
        (
            "an undecodable raft message",
            authenticated(),
            [
                hello(99),
                encode_frame(&Frame::Raft {
                    messages: vec![vec![0xff; 7]],
                }),
            ]
            .concat(),
        ),
        (
            "a raft message for someone else",
            authenticated(),
            [
                hello(99),
                encode_frame(&Frame::Raft {
                    messages: vec![raft_message(99, 5)],
                }),
            ]
            .concat(),
        ),
        (
            "a raft message from someone else",
            authenticated(),
            [
                hello(99),
                encode_frame(&Frame::Raft {
                    messages: vec![raft_message(3, 1)],
                }),
            ]
            .concat(),
        ),
        (
            "a snapshot message inside a raft batch",
            authenticated(),
            [
                hello(99),
                encode_frame(&Frame::Raft {
                    messages: vec![snapshot_message(99, 1, 50)],
                }),
            ]
            .concat(),
        ),
        (
            "a snapshot stream whose message does not decode",
            authenticated(),
            snapshot_stream(hello(99), vec![0xff; 9], 3, &[b"abc"], None),
        ),
        (
            "a snapshot stream carrying another member's snapshot",
            authenticated(),
            snapshot_stream(hello(99), snapshot_message(3, 1, 50), 3, &[b"abc"], None),
        ),
        (
            "a snapshot over the size limit",
            authenticated(),
            snapshot_stream(
                hello(99),
                snapshot_message(99, 1, 50),
                u64::MAX,
                &[b"abc"],
                None,
            ),
        ),
        (
            "a snapshot running past its size",
            authenticated(),
            snapshot_stream(hello(99), snapshot_message(99, 1, 50), 2, &[b"abc"], None),
        ),
        (
            "a snapshot ending short of its size",
            authenticated(),
            snapshot_stream(hello(99), snapshot_message(99, 1, 50), 9, &[b"abc"], None),
        ),
        (
            "a snapshot whose digest does not match",
            authenticated(),
            snapshot_stream(
                hello(99),
                snapshot_message(99, 1, 50),
                3,
                &[b"abc"],
                Some([7; 32]),
            ),
        ),
        (
            "a snapshot stream with a raft batch inside",
            authenticated(),
            [
                hello(99),
                encode_frame(&Frame::SnapshotBegin {
                    message: snapshot_message(99, 1, 50),
                    size: 3,
                }),
                encode_frame(&Frame::Raft { messages: vec![] }),
            ]
            .concat(),
        ),
        (
            "a whole, well-sent snapshot whose file is not a snapshot",
            authenticated(),
            snapshot_stream(
                hello(99),
                snapshot_message(99, 1, 50),
                29,
                &[b"BRINKSNP", b"\x01 not a snapshot file"],
                None,
            ),
        ),
    ];
    for (what, config, bytes) in cases {
        let before = refused();
        let why = send_and_expect_close(&endpoint, config, peer, bytes).await;
        assert!(refused() > before, "{what}: not counted ({why})");
    }

    // A join with the wrong secret is refused with a reason.
    let mut wrong = creds.token.clone();
    wrong.secret[0] ^= 1;
    let answer = transport::request_join(
        &endpoint,
        &peer.to_string(),
        &wrong,
        "127.0.0.1:9",
        &TransportSettings::default(),
    )
    .await
    .expect("an answer");
    assert_eq!(
        answer,
        Frame::JoinRefused {
            reason: "the join token is wrong".into()
        }
    );
    // The right secret with a nonsense address is refused too.
    let answer = transport::request_join(
        &endpoint,
        &peer.to_string(),
        &creds.token,
        "no port",
        &TransportSettings::default(),
    )
    .await
    .expect("an answer");
    assert!(matches!(answer, Frame::JoinRefused { .. }), "{answer:?}");

    // Nothing changed: one voter, no snapshot taken in, no file left behind, and it
    // still commits.
    assert_eq!(running.replica.conf_state().voters, vec![1]);
    let installed = running
        .replica
        .metrics
        .snapshots_installed
        .load(Ordering::Relaxed);
    assert_eq!(installed, 0, "a hostile snapshot was installed");
    let left: Vec<_> = std::fs::read_dir(running.replica.snapshot_dir())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "files left in the snapshot directory: {left:?}"
    );
    let applied = running
        .replica
        .propose(Command {
            ops: vec![Op::Create {
                key: b"/still".to_vec(),
                data: b"here".to_vec(),
            }],
        })
        .await
        .expect("propose");
    assert!(matches!(applied, Applied::Done { .. }), "{applied:?}");
    tokio::task::spawn_blocking(move || running.stop())
        .await
        .expect("join")
        .expect("stop");
}
