//! Two real members on loopback (QUIC, mutual TLS, credentials on disk): the first
//! commits enough to truncate its log, then a newcomer joins and must be sent a snapshot,
//! cut into many small chunks; it installs it, catches up with the log behind it, is
//! promoted, and holds exactly the first member's data. Restarted, it keeps it all.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use brink_control::member::{self, RunningMember, Start};
use brink_control::peers::pki::MemberPki;
use brink_control::settings::{MemberSettings, ReplicaSettings, TransportSettings};
use brink_control::store::{Applied, Command, Op};

fn free_udp() -> std::net::SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    socket.local_addr().expect("addr")
}

fn settings(dir: &std::path::Path, peer: std::net::SocketAddr) -> MemberSettings {
    MemberSettings {
        data_dir: dir.to_path_buf(),
        peer_listen: peer,
        advertise: peer.to_string(),
        replica: ReplicaSettings {
            tick: Duration::from_millis(10),
            snapshot_entries: 40,
            catch_up_entries: 5,
            ..ReplicaSettings::default()
        },
        transport: TransportSettings {
            // A snapshot of a few KB goes as dozens of chunks.
            snapshot_chunk_bytes: 256,
            ..TransportSettings::default()
        },
    }
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn stop(m: RunningMember) {
    tokio::task::spawn_blocking(move || m.stop())
        .await
        .expect("join")
        .expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newcomer_catches_up_by_a_chunked_snapshot() {
    let root = tempfile::tempdir().expect("tempdir");
    let (dir1, dir2) = (root.path().join("m1"), root.path().join("m2"));
    let (peer1, peer2) = (free_udp(), free_udp());
    let first = member::start(settings(&dir1, peer1), Start::Init)
        .await
        .expect("init");
    for i in 0..100 {
        let applied = first
            .replica
            .propose(Command {
                ops: vec![Op::Create {
                    key: format!("/pods/p{i:03}").into_bytes(),
                    data: vec![b'x'; 40],
                }],
            })
            .await
            .expect("propose");
        assert!(matches!(applied, Applied::Done { .. }), "{applied:?}");
    }
    // Snapshot files are written off the ready loop; the log is truncated after.
    wait_until("the first member to truncate its log", || {
        first.replica.metrics.first_index.load(Ordering::Relaxed) > 1
    })
    .await;

    let token = MemberPki::read(&dir1).expect("credentials").token;
    let second = member::start(
        settings(&dir2, peer2),
        Start::Join {
            addr: peer1.to_string(),
            token,
        },
    )
    .await
    .expect("join");
    wait_until("the newcomer to be promoted", || {
        first.replica.conf_state().voters.len() == 2
    })
    .await;
    let sent = first
        .transport
        .metrics
        .snapshots_sent
        .load(Ordering::Relaxed);
    let received = second
        .transport
        .metrics
        .snapshots_received
        .load(Ordering::Relaxed);
    let installed = second
        .replica
        .metrics
        .snapshots_installed
        .load(Ordering::Relaxed);
    assert!(
        sent >= 1 && received >= 1 && installed >= 1,
        "sent {sent}, received {received}, installed {installed}"
    );
    // Writes after the join reach both; both hold the same data.
    first
        .replica
        .propose(Command {
            ops: vec![Op::Create {
                key: b"/pods/after".to_vec(),
                data: b"y".to_vec(),
            }],
        })
        .await
        .expect("propose");
    let want = first
        .replica
        .store()
        .range(b"/pods/", 0, None)
        .unwrap()
        .items;
    wait_until("the newcomer to apply everything", || {
        second
            .replica
            .store()
            .range(b"/pods/", 0, None)
            .is_ok_and(|p| p.items == want)
    })
    .await;
    assert_eq!(want.len(), 101);
    stop(second).await;

    // The newcomer restarts from its own directory (a snapshot and a short log).
    // (In one process the old endpoint's UDP socket goes with its last task: retry.)
    let deadline = Instant::now() + Duration::from_secs(10);
    let second = loop {
        match member::start(settings(&dir2, peer2), Start::Restart).await {
            Ok(m) => break m,
            Err(e) if Instant::now() < deadline && e.to_string().contains("in use") => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("restart: {e}"),
        }
    };
    assert_eq!(
        second
            .replica
            .store()
            .range(b"/pods/", 0, None)
            .unwrap()
            .items,
        want
    );
    stop(second).await;
    stop(first).await;
}
