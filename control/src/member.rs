//! A control-plane member: its data directory's identity, credentials, QUIC endpoint and
//! replica, started as a new cluster (`--init`), a newcomer (`--join`), or again.
//!
//! Owns `DATA_DIR/member.json` (this member's raft id and how it came to be), written
//! last, after the credentials, so that a directory without it is an interrupted start
//! that is refused rather than half used. Answers join requests: checks the token's
//! secret, adds the newcomer as a learner (replacing a member that had the same peer
//! address: a wiped machine coming back), and hands it the CA and the member list.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use brink_proto::peer::{Frame, Member};
use raft::prelude::{ConfChange, ConfChangeType, Message};
use serde::{Deserialize, Serialize};

use crate::consensus::replica::{Bootstrap, Replica, ReplicaError};
use crate::peers::pki::{JoinToken, MemberPki, PkiError, SiteCa};
use crate::peers::transport::{self, PeerHandler, Transport, TransportError};
use crate::settings::{MemberSettings, ReplicaSettings};

const MEMBER_FILE: &str = "member.json";
/// The longest peer address a newcomer may give.
pub const MAX_PEER_ADDR_BYTES: usize = 255;

/// Why a member could not start.
#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error("{path}: {message}")]
    State { path: PathBuf, message: String },
    #[error("the cluster refused to admit this member: {0}")]
    Refused(String),
}

/// How this start begins.
pub enum Start {
    /// A new cluster with this member as its first voter.
    Init,
    /// Join the cluster a member of which listens at `addr`.
    Join { addr: String, token: JoinToken },
    /// The data directory already holds this member.
    Restart,
}

#[derive(Serialize, Deserialize)]
struct MemberFile {
    id: u64,
    joined: bool,
}

fn state_error(path: &Path, message: impl std::fmt::Display) -> MemberError {
    MemberError::State {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

fn write_member_file(dir: &Path, file: &MemberFile) -> Result<(), MemberError> {
    let path = dir.join(MEMBER_FILE);
    let tmp = dir.join(".member.json.tmp");
    let text = serde_json::to_vec(file).map_err(|e| state_error(&path, e))?;
    let write = || -> std::io::Result<()> {
        let f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut &f, &text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| state_error(&path, e))
}

fn read_member_file(dir: &Path) -> Result<MemberFile, MemberError> {
    let path = dir.join(MEMBER_FILE);
    let bytes = std::fs::read(&path).map_err(|e| {
        state_error(
            &path,
            format!("{e}: this directory holds no complete member (an interrupted --init or --join?); move it away and start again"),
        )
    })?;
    let file: MemberFile = serde_json::from_slice(&bytes).map_err(|e| state_error(&path, e))?;
    if file.id == 0 {
        return Err(state_error(&path, "member id 0 is not a raft id"));
    }
    Ok(file)
}

/// A running member.
pub struct RunningMember {
    pub id: u64,
    pub replica: Arc<Replica>,
    pub transport: Arc<Transport>,
    pub pki: MemberPki,
    serve: tokio::task::JoinHandle<()>,
}

impl RunningMember {
    /// Closes the endpoint and stops the replica (blocking: call off the async threads).
    pub fn stop(self) -> Result<(), MemberError> {
        self.serve.abort();
        self.transport.close();
        match Arc::try_unwrap(self.replica) {
            Ok(replica) => replica.stop()?,
            Err(_) => tracing::warn!("requests still hold the replica; leaving it to the OS"),
        }
        Ok(())
    }
}

/// Starts a member. Call within a tokio runtime; blocking parts run on its blocking pool.
pub async fn start(settings: MemberSettings, how: Start) -> Result<RunningMember, MemberError> {
    let dir = settings.data_dir.clone();
    let mut seed_members: Vec<Member> = Vec::new();
    match how {
        Start::Init => {
            let ca = SiteCa::generate()?;
            let pki = MemberPki {
                member: ca.issue_member(1)?,
                token: JoinToken::new(&ca),
                ca,
            };
            pki.write(&dir, Some(&pki.ca.issue_admin()?))?;
            write_member_file(
                &dir,
                &MemberFile {
                    id: 1,
                    joined: false,
                },
            )?;
        }
        Start::Join { addr, token } => {
            let bind: SocketAddr = if settings.peer_listen.is_ipv6() {
                "[::]:0"
            } else {
                "0.0.0.0:0"
            }
            .parse()
            .map_err(|e| state_error(&dir, e))?;
            let endpoint = quinn::Endpoint::client(bind)
                .map_err(|source| TransportError::Bind { addr: bind, source })?;
            let answer = transport::request_join(
                &endpoint,
                &addr,
                &token,
                &settings.advertise,
                &settings.transport,
            )
            .await;
            endpoint.close(0u32.into(), b"done");
            let (id, ca, members) = match answer? {
                Frame::JoinAccepted {
                    id,
                    ca_cert_pem,
                    ca_key_pem,
                    members,
                } => (
                    id,
                    SiteCa::from_pem(&ca_cert_pem, &ca_key_pem, Path::new(&addr))?,
                    members,
                ),
                Frame::JoinRefused { reason } => return Err(MemberError::Refused(reason)),
                _ => return Err(MemberError::Refused("an unexpected answer".into())),
            };
            if ca.hash() != token.ca_hash || id == 0 {
                return Err(MemberError::Refused(
                    "the answer's CA is not the one the token pins".into(),
                ));
            }
            let pki = MemberPki {
                member: ca.issue_member(id)?,
                token,
                ca,
            };
            pki.write(&dir, None)?;
            write_member_file(&dir, &MemberFile { id, joined: true })?;
            seed_members = members;
        }
        Start::Restart => {}
    }
    let file = read_member_file(&dir)?;
    let pki_dir = dir.clone();
    let pki = tokio::task::spawn_blocking(move || MemberPki::read(&pki_dir))
        .await
        .map_err(|e| state_error(&dir, e))??;
    let endpoint = transport::bind(settings.peer_listen, &pki, &settings.transport)?;
    let transport = Transport::new(
        file.id,
        settings.advertise.clone(),
        endpoint,
        &pki,
        settings.transport.clone(),
        dir.join(crate::consensus::replica::SNAPSHOT_DIR),
    )?;
    for m in &seed_members {
        transport.set_peer(m.id, &m.peer_addr);
    }
    let bootstrap = if file.joined {
        Bootstrap::Join
    } else {
        Bootstrap::Init {
            peer_addr: settings.advertise.clone(),
        }
    };
    let request_timeout = settings.replica.request_timeout;
    let replica_settings = ReplicaSettings {
        id: file.id,
        ..settings.replica
    };
    let open_dir = dir.clone();
    let open_transport = transport.clone();
    let replica = tokio::task::spawn_blocking(move || {
        Replica::start(&open_dir, replica_settings, bootstrap, Some(open_transport))
    })
    .await
    .map_err(|e| state_error(&dir, e))??;
    let replica = Arc::new(replica);
    let handler = Arc::new(Handler {
        replica: replica.clone(),
        pki: pki.clone(),
        request_timeout,
    });
    let serve = tokio::spawn(transport.clone().serve(handler));
    Ok(RunningMember {
        id: file.id,
        replica,
        transport,
        pki,
        serve,
    })
}

struct Handler {
    replica: Arc<Replica>,
    pki: MemberPki,
    request_timeout: std::time::Duration,
}

impl PeerHandler for Handler {
    fn step(&self, message: Message) {
        self.replica.step(message);
    }

    fn receive_snapshot(&self, message: Message, file: &Path) -> Result<(), String> {
        let meta = message.get_snapshot().get_metadata();
        let header = crate::store::snapshot::verify(file).map_err(|e| e.to_string())?;
        if header.index != meta.index || header.term != meta.term {
            return Err(format!(
                "the snapshot file holds index {} term {}, its message says {} and {}",
                header.index, header.term, meta.index, meta.term
            ));
        }
        let dir = self.replica.snapshot_dir();
        let target = dir.join(crate::store::snapshot::file_name(meta.index));
        std::fs::rename(file, &target)
            .and_then(|()| std::fs::File::open(&dir)?.sync_all())
            .map_err(|e| format!("{}: {e}", target.display()))?;
        self.replica.step(message);
        Ok(())
    }

    fn snapshot_sent(&self, to: u64, ok: bool) {
        self.replica.snapshot_sent(to, ok);
    }

    fn join(
        &self,
        secret: Vec<u8>,
        peer_addr: String,
    ) -> Pin<Box<dyn Future<Output = Frame> + Send + '_>> {
        Box::pin(async move {
            match self.admit(&secret, &peer_addr).await {
                Ok(frame) => frame,
                Err(reason) => {
                    tracing::warn!(%peer_addr, %reason, "join refused");
                    Frame::JoinRefused { reason }
                }
            }
        })
    }
}

/// How long one attempt at a membership change waits before looking whether it took
/// effect and trying again: raft drops a change proposed while another is pending (a new
/// leader's first moments, a promotion) without a word to the proposer.
pub const CONF_CHANGE_ATTEMPT: std::time::Duration = std::time::Duration::from_secs(1);

impl Handler {
    /// Proposes `change` until `done` holds for the applied configuration, or the
    /// replica's request timeout has passed several times over.
    async fn change_until(
        &self,
        change: ConfChange,
        done: impl Fn(&raft::prelude::ConfState) -> bool,
    ) -> Result<(), ReplicaError> {
        let deadline = tokio::time::Instant::now() + 3 * self.request_timeout;
        loop {
            let attempt = tokio::time::timeout(
                CONF_CHANGE_ATTEMPT,
                self.replica.change_membership(change.clone()),
            )
            .await;
            match attempt {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(ReplicaError::Timeout(_) | ReplicaError::Dropped(_))) | Err(_) => {}
                Ok(Err(e)) => return Err(e),
            }
            if done(&self.replica.conf_state()) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ReplicaError::Timeout(3 * self.request_timeout));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    async fn members(&self) -> Result<Vec<(u64, String)>, String> {
        let replica = self.replica.clone();
        tokio::task::spawn_blocking(move || replica.store().members())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    async fn admit(&self, secret: &[u8], peer_addr: &str) -> Result<Frame, String> {
        if !self.pki.token.secret_matches(secret) {
            return Err("the join token is wrong".into());
        }
        if peer_addr.is_empty()
            || peer_addr.len() > MAX_PEER_ADDR_BYTES
            || peer_addr.rsplit_once(':').is_none_or(|(host, port)| {
                host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0)
            })
        {
            return Err(format!(
                "peer address {peer_addr:?} is not host:port (at most {MAX_PEER_ADDR_BYTES} bytes)"
            ));
        }
        let members = self.members().await?;
        // A member coming back from the same address after losing its disk is a new
        // member: its old self goes first, so it is never counted twice.
        if let Some((old, _)) = members.iter().find(|(_, a)| a == peer_addr) {
            tracing::info!(member = old, %peer_addr, "replacing the member that had this address");
            let mut change = ConfChange::default();
            change.set_change_type(ConfChangeType::RemoveNode);
            change.node_id = *old;
            let old = *old;
            self.change_until(change, |conf| {
                !conf.voters.contains(&old) && !conf.learners.contains(&old)
            })
            .await
            .map_err(|e| format!("removing the old member {old}: {e}"))?;
        }
        let id = loop {
            // Small ids read well in logs and metrics; 2^32 leaves collisions unlikely and
            // the loop rules them out.
            let id = fastrand::u64(2..=u64::from(u32::MAX));
            if !members.iter().any(|(m, _)| *m == id) {
                break id;
            }
        };
        let mut change = ConfChange::default();
        change.set_change_type(ConfChangeType::AddLearnerNode);
        change.node_id = id;
        change.context = peer_addr.as_bytes().to_vec().into();
        self.change_until(change, |conf| {
            conf.learners.contains(&id) || conf.voters.contains(&id)
        })
        .await
        .map_err(|e| format!("adding the member: {e}"))?;
        tracing::info!(member = id, %peer_addr, "admitted a new member as a learner");
        let members = self.members().await?;
        Ok(Frame::JoinAccepted {
            id,
            ca_cert_pem: self.pki.ca.cert_pem.clone(),
            ca_key_pem: self.pki.ca.key_pem().to_owned(),
            members: members
                .into_iter()
                .map(|(id, peer_addr)| Member { id, peer_addr })
                .collect(),
        })
    }
}
