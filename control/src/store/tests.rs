use super::*;

fn create(key: &str, data: &str) -> Op {
    Op::Create {
        key: key.into(),
        data: data.into(),
    }
}

fn update(key: &str, data: &str, expect_mod: Option<u64>) -> Op {
    Op::Update {
        key: key.into(),
        data: data.into(),
        expect_mod,
    }
}

fn delete(key: &str, expect_mod: Option<u64>) -> Op {
    Op::Delete {
        key: key.into(),
        expect_mod,
    }
}

fn cmd(ops: Vec<Op>) -> Command {
    Command { ops }
}

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("store")).expect("open");
    (dir, store)
}

#[test]
fn revisions_follow_the_raft_index_of_writes() {
    let (_dir, s) = open();
    assert_eq!(
        s.apply(3, &cmd(vec![create("/pods/a", "1")])).unwrap(),
        Applied::Done { revision: 3 }
    );
    let a = s.get(b"/pods/a").unwrap().unwrap();
    assert_eq!((a.create_revision, a.mod_revision, a.version), (3, 3, 1));
    s.apply(5, &cmd(vec![update("/pods/a", "2", Some(3))]))
        .unwrap();
    let a = s.get(b"/pods/a").unwrap().unwrap();
    assert_eq!(
        (
            a.create_revision,
            a.mod_revision,
            a.version,
            a.data.as_slice()
        ),
        (3, 5, 2, &b"2"[..])
    );
    // A refused write moves the applied index, not the revision.
    assert_eq!(
        s.apply(6, &cmd(vec![create("/pods/a", "x")])).unwrap(),
        Applied::Refused(Refusal::AlreadyExists { op: 0 })
    );
    assert_eq!((s.applied_index().unwrap(), s.revision().unwrap()), (6, 5));
}

#[test]
fn compare_and_set_refuses_stale_writers() {
    let (_dir, s) = open();
    s.apply(1, &cmd(vec![create("/k", "v1")])).unwrap();
    s.apply(2, &cmd(vec![update("/k", "v2", Some(1))])).unwrap();
    assert_eq!(
        s.apply(3, &cmd(vec![update("/k", "lost", Some(1))]))
            .unwrap(),
        Applied::Refused(Refusal::Conflict {
            op: 0,
            actual_mod: 2
        })
    );
    assert_eq!(
        s.apply(4, &cmd(vec![delete("/k", Some(1))])).unwrap(),
        Applied::Refused(Refusal::Conflict {
            op: 0,
            actual_mod: 2
        })
    );
    assert_eq!(
        s.apply(5, &cmd(vec![update("/missing", "x", None)]))
            .unwrap(),
        Applied::Refused(Refusal::NotFound { op: 0 })
    );
    assert_eq!(s.get(b"/k").unwrap().unwrap().data, b"v2");
    s.apply(6, &cmd(vec![delete("/k", Some(2))])).unwrap();
    assert_eq!(s.get(b"/k").unwrap(), None);
    // Created again: a new life, a new create revision.
    s.apply(7, &cmd(vec![create("/k", "again")])).unwrap();
    let k = s.get(b"/k").unwrap().unwrap();
    assert_eq!((k.create_revision, k.version), (7, 1));
}

#[test]
fn transactions_are_all_or_nothing() {
    let (_dir, s) = open();
    s.apply(1, &cmd(vec![create("/pods/p", "unbound")]))
        .unwrap();
    // A binding: the pod's update and the binding's create together; the second op
    // fails, so neither happens.
    s.apply(2, &cmd(vec![create("/bindings/p", "node-a")]))
        .unwrap();
    let refused = s
        .apply(
            3,
            &cmd(vec![
                update("/pods/p", "bound to b", Some(1)),
                create("/bindings/p", "node-b"),
            ]),
        )
        .unwrap();
    assert_eq!(refused, Applied::Refused(Refusal::AlreadyExists { op: 1 }));
    assert_eq!(s.get(b"/pods/p").unwrap().unwrap().data, b"unbound");
    assert!(
        s.events_after(b"", 2, 0).unwrap().is_empty(),
        "no event for a refused txn"
    );
    // The same key twice, or nothing at all, is refused outright.
    for (index, bad) in [
        (4, cmd(vec![create("/x", "1"), delete("/x", None)])),
        (5, cmd(vec![])),
    ] {
        assert!(matches!(
            s.apply(index, &bad).unwrap(),
            Applied::Refused(Refusal::Invalid { .. })
        ));
    }
}

#[test]
fn replays_after_a_restart_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    {
        let s = Store::open(&path).unwrap();
        s.apply(1, &cmd(vec![create("/a", "1")])).unwrap();
        s.apply(2, &cmd(vec![update("/a", "2", None)])).unwrap();
        s.flush().unwrap();
    }
    let s = Store::open(&path).unwrap();
    assert_eq!(s.applied_index().unwrap(), 2);
    // raft hands the last entries again: they were applied, so nothing moves.
    assert_eq!(
        s.apply(2, &cmd(vec![update("/a", "2", None)])).unwrap(),
        Applied::AlreadyApplied
    );
    assert_eq!(
        s.apply(1, &cmd(vec![create("/a", "1")])).unwrap(),
        Applied::AlreadyApplied
    );
    let a = s.get(b"/a").unwrap().unwrap();
    assert_eq!((a.version, a.mod_revision), (2, 2));
    assert_eq!(s.events_after(b"/", 0, 0).unwrap().len(), 2);
}

#[test]
fn ranges_page_by_prefix_in_key_order() {
    let (_dir, s) = open();
    let mut index = 0;
    for name in ["c", "a", "e", "b", "d"] {
        index += 1;
        s.apply(
            index,
            &cmd(vec![create(&format!("/pods/default/{name}"), name)]),
        )
        .unwrap();
    }
    s.apply(9, &cmd(vec![create("/pods2/x", "other prefix")]))
        .unwrap();
    let first = s.range(b"/pods/", 2, None).unwrap();
    let names = |p: &Page| -> Vec<String> {
        p.items
            .iter()
            .map(|(_, v)| String::from_utf8_lossy(&v.data).into_owned())
            .collect()
    };
    assert_eq!(names(&first), ["a", "b"]);
    assert_eq!(first.revision, 9);
    let token = first.continue_token.clone().expect("more follow");
    let second = s.range(b"/pods/", 2, Some(&token)).unwrap();
    assert_eq!(names(&second), ["c", "d"]);
    let third = s
        .range(b"/pods/", 2, second.continue_token.as_deref())
        .unwrap();
    assert_eq!(names(&third), ["e"]);
    assert_eq!(third.continue_token, None);
    assert_eq!(s.range(b"/pods/", 0, None).unwrap().items.len(), 5);
    // Garbage tokens, and tokens from another prefix, are refused.
    for bad in ["", "x", "9.zz", "9.abc", "-1.00", "9.2f706f647332"] {
        assert!(
            matches!(
                s.range(b"/pods/", 2, Some(bad)),
                Err(StoreError::BadContinue)
            ),
            "{bad}"
        );
    }
}

#[test]
fn watches_see_every_change_in_order_until_compacted() {
    let (_dir, s) = open();
    s.apply(1, &cmd(vec![create("/pods/a", "1")])).unwrap();
    s.apply(2, &cmd(vec![create("/nodes/n", "1")])).unwrap();
    s.apply(
        3,
        &cmd(vec![update("/pods/a", "2", None), create("/pods/b", "1")]),
    )
    .unwrap();
    s.apply(4, &cmd(vec![delete("/pods/a", None)])).unwrap();
    let events = s.events_after(b"/pods/", 0, 0).unwrap();
    let seen: Vec<(u64, String, bool)> = events
        .iter()
        .map(|e| {
            (
                e.revision,
                String::from_utf8_lossy(&e.key).into_owned(),
                matches!(e.kind, EventKind::Put(_)),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (1, "/pods/a".into(), true),
            (3, "/pods/a".into(), true),
            (3, "/pods/b".into(), true),
            (4, "/pods/a".into(), false)
        ]
    );
    // A delete carries the last value.
    let EventKind::Delete(last) = &events[3].kind else {
        panic!("not a delete")
    };
    assert_eq!(last.data, b"2");
    assert_eq!(s.events_after(b"/pods/", 3, 0).unwrap().len(), 1);
    assert_eq!(s.events_after(b"/pods/", 0, 2).unwrap().len(), 2);

    s.compact(3).unwrap();
    assert_eq!(s.compacted().unwrap(), 3);
    // After 2 means from 3: still all there. After 1 needs 2: gone.
    assert_eq!(s.events_after(b"/pods/", 2, 0).unwrap().len(), 3);
    assert!(matches!(
        s.events_after(b"/pods/", 1, 0),
        Err(StoreError::Gone {
            asked: 1,
            compacted: 3
        })
    ));
    // Compaction never runs ahead of the store, nor backwards.
    s.compact(100).unwrap();
    assert_eq!(s.compacted().unwrap(), 4);
    s.compact(2).unwrap();
    assert_eq!(s.compacted().unwrap(), 4);
    // A continue token from before the compaction point is gone too.
    let stale = codec::encode_continue(2, b"/pods/a");
    assert!(matches!(
        s.range(b"/pods/", 1, Some(&stale)),
        Err(StoreError::Gone { .. })
    ));
}

#[test]
fn a_directory_in_use_is_refused_after_a_short_wait() {
    let (dir, _held) = open();
    let started = std::time::Instant::now();
    let err = Store::open(&dir.path().join("store"))
        .err()
        .expect("a second holder must be refused");
    assert!(err.to_string().contains("could not acquire lock"), "{err}");
    assert!(started.elapsed() >= DIRECTORY_LOCK_WAIT);
}

#[test]
fn corrupt_records_are_reported_with_the_file_and_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    {
        let s = Store::open(&path).unwrap();
        s.apply(1, &cmd(vec![create("/a", "1")])).unwrap();
        // Damage a record the way a bad disk or a foreign writer would.
        s.kv.insert(b"/a", &b"short"[..]).unwrap();
        s.flush().unwrap();
    }
    let err = Store::open(&path)
        .err()
        .expect("a corrupt store must not open");
    let text = err.to_string();
    assert!(text.contains("kv record \"/a\" is corrupt"), "{text}");
    assert!(text.contains(&path.display().to_string()), "{text}");

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    {
        let s = Store::open(&path).unwrap();
        s.meta.insert(META_APPLIED, &b"xyz"[..]).unwrap();
        s.history.insert(b"abc", &b"\x09whatever"[..]).unwrap();
        s.flush().unwrap();
    }
    assert!(Store::open(&path).is_err());
}

#[test]
fn commands_round_trip_and_garbage_is_refused() {
    let command = cmd(vec![
        create("/a", "1"),
        update("/b", "2", Some(7)),
        update("/c", "", None),
        delete("/d", Some(u64::MAX)),
        delete("/e", None),
    ]);
    let bytes = encode_command(&command);
    assert_eq!(decode_command(&bytes).unwrap(), command);
    // Every cut of a valid command, flipped tags and versions, absurd counts.
    for end in 0..bytes.len() {
        assert!(decode_command(&bytes[..end]).is_err(), "cut at {end}");
    }
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert!(matches!(
        decode_command(&trailing),
        Err(CommandError::Trailing(1))
    ));
    let mut version = bytes.clone();
    version[0] = 9;
    assert!(matches!(
        decode_command(&version),
        Err(CommandError::Version(9))
    ));
    let mut tag = bytes.clone();
    tag[5] = 77;
    assert!(matches!(decode_command(&tag), Err(CommandError::Tag(77))));
    assert!(decode_command(&[1, 0xff, 0xff, 0xff, 0xff]).is_err());
    // Pseudo-random garbage never panics.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..2000 {
        let len = (state % 64) as usize;
        let garbage: Vec<u8> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let _ = decode_command(&garbage);
    }
}

#[test]
fn codec_refuses_garbage() {
    for bytes in [&b""[..], b"\x01", &[0u8; 23]] {
        assert!(codec::decode_value(bytes).is_err());
    }
    assert!(codec::decode_event_kind(&[3; 30]).is_err());
    assert!(codec::decode_event_kind(b"").is_err());
    assert!(codec::decode_history_key(b"1234567").is_err());
    assert!(codec::decode_u64(b"123456789").is_err());
    let v = Value {
        data: b"data".to_vec(),
        create_revision: 1,
        mod_revision: 2,
        version: 3,
    };
    assert_eq!(codec::decode_value(&codec::encode_value(&v)).unwrap(), v);
    assert_eq!(
        codec::decode_continue(&codec::encode_continue(7, b"/k\x00\xff")),
        Some((7, b"/k\x00\xff".to_vec()))
    );
}

mod snapshots {
    use super::*;
    use crate::store::snapshot::{self, SnapshotHeader};

    /// A store with puts, an update, a delete, a refusal, a member and a compaction.
    fn busy() -> (tempfile::TempDir, Store) {
        let (dir, s) = open();
        for i in 1..=40u64 {
            s.apply(i, &cmd(vec![create(&format!("/pods/p{i:02}"), "v")]))
                .unwrap();
        }
        s.apply(41, &cmd(vec![update("/pods/p01", "w", Some(1))]))
            .unwrap();
        s.apply(42, &cmd(vec![delete("/pods/p02", None)])).unwrap();
        s.apply(43, &cmd(vec![create("/pods/p03", "dup")])).unwrap();
        s.apply_membership(44, 1, Some("10.0.0.1:2380")).unwrap();
        s.compact(10).unwrap();
        (dir, s)
    }

    fn header(index: u64) -> SnapshotHeader {
        SnapshotHeader {
            index,
            term: 3,
            conf: vec![8, 1],
        }
    }

    fn state(s: &Store) -> impl PartialEq + std::fmt::Debug {
        (
            s.range(b"/", 0, None).unwrap(),
            s.events_after(b"/", 9, 0).unwrap(),
            s.members().unwrap(),
            (
                s.applied_index().unwrap(),
                s.revision().unwrap(),
                s.compacted().unwrap(),
            ),
        )
    }

    #[test]
    fn a_snapshot_installs_the_same_state_elsewhere() {
        let (dir, source) = busy();
        let (path, size) =
            snapshot::write(&source, &dir.path().join("snaps"), &header(44)).unwrap();
        assert!(size > 0);
        assert_eq!(snapshot::verify(&path).unwrap(), header(44));
        // The target had other data: all of it is replaced.
        let (_other, target) = open();
        target.apply(7, &cmd(vec![create("/other", "x")])).unwrap();
        assert_eq!(target.install(&path).unwrap(), header(44));
        assert_eq!(target.installing().unwrap(), Some(44));
        target.finish_install().unwrap();
        assert_eq!(target.installing().unwrap(), None);
        assert_eq!(state(&target), state(&source));
        assert!(target.get(b"/other").unwrap().is_none());
        // The history before the compaction point stays gone there too.
        assert!(matches!(
            target.events_after(b"/", 3, 0),
            Err(StoreError::Gone { .. })
        ));
    }

    #[test]
    fn a_damaged_snapshot_is_refused_and_changes_nothing() {
        let (dir, source) = busy();
        let (path, _) = snapshot::write(&source, &dir.path().join("snaps"), &header(44)).unwrap();
        let good = std::fs::read(&path).unwrap();
        let (_other, target) = open();
        target.apply(7, &cmd(vec![create("/other", "x")])).unwrap();
        let before = state(&target);
        let bad = dir.path().join("bad.snap");
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut cases: Vec<Vec<u8>> = vec![
            Vec::new(),
            good[..good.len() - 1].to_vec(),
            [good.clone(), vec![0]].concat(),
            good[..good.len() / 2].to_vec(),
        ];
        for _ in 0..200 {
            let mut b = good.clone();
            let i = (next() as usize) % b.len();
            b[i] ^= 1 << (next() % 8);
            cases.push(b);
        }
        for (n, bytes) in cases.iter().enumerate() {
            std::fs::write(&bad, bytes).unwrap();
            let err = target.install(&bad).err();
            assert!(
                matches!(err, Some(snapshot::SnapshotError::Damaged { .. })),
                "case {n}: {err:?}"
            );
            assert!(
                err.unwrap().to_string().contains("bad.snap"),
                "names the file"
            );
            assert_eq!(target.installing().unwrap(), None, "case {n}");
        }
        assert_eq!(state(&target), before);
        // A header that claims another index than the state it holds is refused too.
        let lying = dir.path().join("lying");
        let (path, _) = snapshot::write(&source, &lying, &header(50)).unwrap();
        assert!(snapshot::verify(&path).is_err());
    }

    #[test]
    fn file_names_sort_by_index_and_parse_back() {
        assert_eq!(snapshot::file_name(42), "00000000000000000042.snap");
        assert_eq!(
            snapshot::index_of(&snapshot::file_name(u64::MAX)),
            Some(u64::MAX)
        );
        for bad in [
            "42.snap",
            "0000000000000000004x.snap",
            "00000000000000000042.snap.tmp",
            "",
        ] {
            assert_eq!(snapshot::index_of(bad), None, "{bad}");
        }
    }
}

#[test]
fn a_batch_of_entries_applies_in_order_each_seeing_the_last_and_replays_change_nothing() {
    let (_dir, s) = open();
    let batch = [
        (1, cmd(vec![create("/a", "1")])),
        (2, cmd(vec![update("/a", "2", Some(1))])),
        (3, cmd(vec![create("/a", "again")])),
        (4, cmd(vec![delete("/a", Some(2)), create("/b", "b")])),
    ];
    let refs: Vec<(u64, &Command)> = batch.iter().map(|(i, c)| (*i, c)).collect();
    assert_eq!(
        s.apply_many(&refs).unwrap(),
        vec![
            Applied::Done { revision: 1 },
            Applied::Done { revision: 2 },
            Applied::Refused(Refusal::AlreadyExists { op: 0 }),
            Applied::Done { revision: 4 },
        ]
    );
    assert!(s.get(b"/a").unwrap().is_none());
    assert_eq!(s.get(b"/b").unwrap().unwrap().create_revision, 4);
    assert_eq!((s.applied_index().unwrap(), s.revision().unwrap()), (4, 4));
    let events: Vec<u64> = s
        .events_after(b"/", 0, 0)
        .unwrap()
        .iter()
        .map(|e| e.revision)
        .collect();
    assert_eq!(events, vec![1, 2, 4, 4]);
    // The same batch again (a replay after a restart): nothing changes.
    assert!(
        s.apply_many(&refs)
            .unwrap()
            .iter()
            .all(|o| *o == Applied::AlreadyApplied)
    );
    assert_eq!(s.events_after(b"/", 0, 0).unwrap().len(), 4);
}
