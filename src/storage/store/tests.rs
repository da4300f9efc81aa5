//! Recovery outcomes, one per kind of damage.

use super::*;
use crate::engine::{Observation, StreamState};

fn options() -> Options {
    Options {
        ensemble: 8,
        hidden: 3,
        lags: 2,
        ..Options::default()
    }
    .check()
    .unwrap()
}

fn config() -> StorageConfig {
    StorageConfig {
        snapshot_every: u64::MAX,
        ..StorageConfig::default()
    }
}

fn batch(from: usize, n: usize) -> Vec<Observation> {
    (from..from + n)
        .map(|i| Observation {
            seq: None,
            x: vec![],
            y: vec![5.0 + (i as f64 / 3.0).sin()],
        })
        .collect()
}

/// Appends and applies batches the way the owner does; returns the in-memory reference.
fn feed(stream: &mut Stream, store: &mut StreamStore, batches: &[Vec<Observation>]) {
    for b in batches {
        let plan = stream.plan(b).unwrap();
        store.append(&[(plan.first_seq, b.as_slice())]).unwrap();
        stream.apply(b, &plan, |_| {});
    }
}

fn recovered(store: &Store, name: &str) -> (Box<Stream>, RecoveryReport) {
    match store.recover_stream(name) {
        Some(Recovered::Ok(s, _, r)) => (s, r),
        Some(Recovered::Failed(_, e)) => panic!("recovery failed: {e}"),
        None => panic!("stream vanished"),
    }
}

fn state(s: &Stream) -> StreamState {
    s.state()
}

#[test]
fn log_only_recovery_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    let mut ss = store.create_stream("a", &options()).unwrap();
    let mut s = Stream::new(options());
    feed(&mut s, &mut ss, &[batch(0, 5), batch(5, 1), batch(6, 30)]);
    drop(ss);
    let (r, report) = recovered(&Store::open(dir.path(), config()).unwrap(), "a");
    assert_eq!(state(&r), state(&s));
    assert_eq!(
        (report.replayed, report.snapshot_seq, report.last_seq),
        (36, None, 36)
    );
}

#[test]
fn snapshot_plus_log_and_fallback_to_the_older_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    let mut ss = store.create_stream("b", &options()).unwrap();
    let mut s = Stream::new(options());
    feed(&mut s, &mut ss, &[batch(0, 10)]);
    ss.snapshot(&s).unwrap();
    feed(&mut s, &mut ss, &[batch(10, 10)]);
    ss.snapshot(&s).unwrap();
    feed(&mut s, &mut ss, &[batch(20, 7)]);
    drop(ss);
    let (r, report) = recovered(&store, "b");
    assert_eq!(state(&r), state(&s));
    assert_eq!((report.snapshot_seq, report.replayed), (Some(20), 7));

    // Corrupt the newest snapshot: recovery falls back to seq 10 and replays 17.
    let newest = dir
        .path()
        .join("streams/b")
        .join(snapshot::snapshot_name(20));
    let mut bytes = fs::read(&newest).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x10;
    fs::write(&newest, &bytes).unwrap();
    let (r, report) = recovered(&store, "b");
    assert_eq!(state(&r), state(&s));
    assert_eq!(
        (report.snapshot_seq, report.bad_snapshots, report.replayed),
        (Some(10), 1, 17)
    );

    // A truncated snapshot is skipped the same way.
    fs::write(&newest, &bytes[..n / 3]).unwrap();
    let (r, report) = recovered(&store, "b");
    assert_eq!(state(&r), state(&s));
    assert_eq!(report.snapshot_seq, Some(10));
}

#[test]
fn old_snapshots_and_segments_are_pruned_but_the_fallback_survives() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    let mut ss = store.create_stream("p", &options()).unwrap();
    let mut s = Stream::new(options());
    for k in 0..5 {
        feed(&mut s, &mut ss, &[batch(k * 10, 10)]);
        ss.snapshot(&s).unwrap();
    }
    let d = dir.path().join("streams/p");
    let snaps: Vec<u64> = snapshot::list(&d)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(snaps, vec![50, 40]);
    let segs: Vec<u64> = wal::list_segments(&d)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(
        segs,
        vec![41, 51],
        "the log reaches back to the older snapshot"
    );
}

#[test]
fn stray_temporary_files_do_not_block_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    let mut ss = store.create_stream("t", &options()).unwrap();
    let mut s = Stream::new(options());
    feed(&mut s, &mut ss, &[batch(0, 12)]);
    let d = dir.path().join("streams/t");
    fs::write(d.join("snapshot-00000000000000000012.tmp"), b"half a snap").unwrap();
    fs::write(d.join("options.tmp"), b"{").unwrap();
    let (r, _) = recovered(&store, "t");
    assert_eq!(state(&r), state(&s));
    assert!(!d.join("snapshot-00000000000000000012.tmp").exists());
}

#[test]
fn a_torn_tail_is_cut_and_appending_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    let mut ss = store.create_stream("w", &options()).unwrap();
    let mut s = Stream::new(options());
    feed(&mut s, &mut ss, &[batch(0, 6)]);
    let before_last = s.clone();
    feed(&mut s, &mut ss, &[batch(6, 4)]);
    drop(ss);
    let seg = dir.path().join("streams/w").join(wal::segment_name(1));
    let len = fs::metadata(&seg).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 5)
        .unwrap();
    let Some(Recovered::Ok(mut r, mut rs, report)) = store.recover_stream("w") else {
        panic!("recovery failed")
    };
    assert!(report.torn_bytes > 0);
    assert_eq!(state(&r), state(&before_last));
    // The stream continues from seq 7 and a second recovery sees it all.
    let mut reference = before_last;
    let b = batch(6, 4);
    let plan = r.plan(&b).unwrap();
    rs.append(&[(plan.first_seq, b.as_slice())]).unwrap();
    r.apply(&b, &plan, |_| {});
    let plan = reference.plan(&b).unwrap();
    reference.apply(&b, &plan, |_| {});
    drop(rs);
    let (again, report) = recovered(&store, "w");
    assert_eq!(report.torn_bytes, 0);
    assert_eq!(state(&again), state(&reference));
}

#[test]
fn corruption_before_the_tail_fails_the_stream_naming_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    let mut ss = store.create_stream("c", &options()).unwrap();
    let mut s = Stream::new(options());
    feed(&mut s, &mut ss, &[batch(0, 6), batch(6, 6)]);
    drop(ss);
    let seg = dir.path().join("streams/c").join(wal::segment_name(1));
    let mut bytes = fs::read(&seg).unwrap();
    bytes[30] ^= 0xff; // inside the first record
    fs::write(&seg, &bytes).unwrap();
    match store.recover_stream("c") {
        Some(Recovered::Failed(o, reason)) => {
            assert_eq!(o, options());
            assert!(reason.contains("wal-00000000000000000001.log"), "{reason}");
            assert!(reason.contains("offset 20"), "{reason}");
        }
        _ => panic!("corruption must fail the stream"),
    }
}

#[test]
fn empty_or_missing_data_dir_and_unacknowledged_creations() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("does/not/exist");
    let store = Store::open(&root, config()).unwrap();
    assert!(store.stream_names().unwrap().is_empty());
    // A folder without options.json was never acknowledged: it goes.
    fs::create_dir_all(root.join("streams/ghost")).unwrap();
    assert!(store.recover_stream("ghost").is_none());
    assert!(!root.join("streams/ghost").exists());
    // Unreadable options fail the stream rather than guessing.
    fs::create_dir_all(root.join("streams/bad")).unwrap();
    fs::write(root.join("streams/bad/options.json"), b"{\"hidden\": ").unwrap();
    assert!(matches!(
        store.recover_stream("bad"),
        Some(Recovered::Failed(..))
    ));
}

#[test]
fn delete_is_durable_and_a_new_stream_of_the_same_name_starts_fresh() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    let mut ss = store.create_stream("d", &options()).unwrap();
    let mut s = Stream::new(options());
    feed(&mut s, &mut ss, &[batch(0, 6)]);
    drop(ss);
    store.delete_stream("d").unwrap();
    assert!(store.stream_names().unwrap().is_empty());
    let _ = store.create_stream("d", &options()).unwrap();
    let (r, _) = recovered(&store, "d");
    assert_eq!(r.last_seq(), 0);
}

#[test]
fn f32_streams_recover_bit_for_bit_from_a_snapshot_and_the_log_issue_6() {
    let o = Options {
        precision: crate::engine::Precision::F32,
        ..options()
    };
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    let mut ss = store.create_stream("f", &o).unwrap();
    let mut s = Stream::new(o.clone());
    feed(&mut s, &mut ss, &[batch(0, 15)]);
    ss.snapshot(&s).unwrap();
    feed(&mut s, &mut ss, &[batch(15, 9)]);
    drop(ss);
    let (mut r, report) = recovered(&store, "f");
    assert_eq!(report.replayed, 9);
    assert_eq!(r.options().precision, crate::engine::Precision::F32);
    assert_eq!(state(&r), state(&s));
    // And it goes on learning the same bits.
    let next = batch(24, 5);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let plan = s.plan(&next).unwrap();
    s.apply(&next, &plan, |x| a.push(x.prediction));
    r.apply(&next, &plan, |x| b.push(x.prediction));
    assert_eq!(a, b);
    assert_eq!(state(&r), state(&s));
}

/// A crash between creating a new log segment (after a snapshot) and writing its header leaves
/// a file shorter than the header. It held nothing: recovery removes it, the stream is exactly
/// where it was, and logging goes on. (The crash harness found it once updates got faster and
/// segments rotated more often.)
#[test]
fn a_segment_whose_creation_was_cut_short_is_removed_and_nothing_is_lost() {
    for torn_len in [0usize, 7, 19] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), config()).unwrap();
        let mut ss = store.create_stream("t", &options()).unwrap();
        let mut s = Stream::new(options());
        feed(&mut s, &mut ss, &[batch(0, 10)]);
        ss.snapshot(&s).unwrap();
        feed(&mut s, &mut ss, &[batch(10, 6)]);
        drop(ss);
        let stream_dir = dir.path().join("streams/t");
        let next = s.last_seq() + 1;
        let torn = stream_dir.join(wal::segment_name(next));
        let mut header = b"EKIDWAL1".to_vec();
        header.extend_from_slice(&1u32.to_le_bytes());
        header.extend_from_slice(&next.to_le_bytes());
        fs::write(&torn, &header[..torn_len]).unwrap();
        let (mut r, _) = recovered(&store, "t");
        assert_eq!(state(&r), state(&s), "torn header of {torn_len} bytes");
        // Removed (and, as the log's tail is gone, created again whole for what comes next).
        assert!(!torn.exists() || !wal::is_torn_creation(&torn).unwrap());
        // Logging goes on, and a second recovery sees it all.
        let mut ss = match store.recover_stream("t") {
            Some(Recovered::Ok(_, files, _)) => files,
            _ => panic!("stream vanished"),
        };
        feed(&mut r, &mut ss, &[batch(16, 4)]);
        drop(ss);
        let (again, _) = recovered(&store, "t");
        assert_eq!(state(&again), state(&r));
        assert_eq!(again.last_seq(), 20);
    }
}

#[test]
fn damage_in_a_segment_the_snapshot_covers_is_reported_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    let mut ss = store.create_stream("k", &options()).unwrap();
    let mut s = Stream::new(options());
    feed(&mut s, &mut ss, &[batch(0, 10)]);
    ss.snapshot(&s).unwrap();
    feed(&mut s, &mut ss, &[batch(10, 5), batch(15, 5)]);
    ss.snapshot(&s).unwrap();
    feed(&mut s, &mut ss, &[batch(20, 3), batch(23, 3)]);
    drop(ss);
    let d = dir.path().join("streams/k");
    // wal-11 holds 11..20, all in the snapshot at 20: only the fallback to 10 needs it.
    let covered = d.join(wal::segment_name(11));
    let mut bytes = fs::read(&covered).unwrap();
    bytes[30] ^= 0xff;
    fs::write(&covered, &bytes).unwrap();
    let (r, report) = recovered(&store, "k");
    assert_eq!(state(&r), state(&s));
    assert_eq!(report.snapshot_seq, Some(20));
    assert_eq!(report.damaged_unneeded.len(), 1, "{report:?}");
    assert!(report.damaged_unneeded[0].contains("wal-00000000000000000011.log"));
    assert!(!report.damaged_unneeded[0].contains(&*dir.path().to_string_lossy()));
    let listing = crate::storage::inspect(dir.path()).unwrap();
    assert!(listing[0].ok() && listing[0].damaged());
    // Once the fallback needs it (the newest snapshot is unreadable), the damage fails the
    // stream, naming the file without the host's path.
    let newest = d.join(snapshot::snapshot_name(20));
    let mut snap = fs::read(&newest).unwrap();
    let n = snap.len();
    snap[n / 2] ^= 0x10;
    fs::write(&newest, &snap).unwrap();
    match store.recover_stream("k") {
        Some(Recovered::Failed(_, reason)) => {
            assert!(reason.contains("wal-00000000000000000011.log"), "{reason}");
            assert!(!reason.contains(&*dir.path().to_string_lossy()), "{reason}");
        }
        _ => panic!("a damaged segment recovery needs must fail the stream"),
    }
    assert!(!crate::storage::inspect(dir.path()).unwrap()[0].ok());
}

#[test]
fn a_creation_that_fails_after_the_rename_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), config()).unwrap();
    store.fail_after_options_rename("n");
    assert!(store.create_stream("n", &options()).is_err());
    assert!(store.stream_names().unwrap().is_empty());
    assert!(store.create_stream("m", &options()).is_ok());
    assert_eq!(store.stream_names().unwrap(), vec!["m".to_owned()]);
}

#[test]
fn a_delete_that_cannot_move_the_files_leaves_the_stream_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    let mut ss = store.create_stream("e", &options()).unwrap();
    let mut s = Stream::new(options());
    feed(&mut s, &mut ss, &[batch(0, 6)]);
    let trash = dir.path().join("trash");
    fs::remove_dir(&trash).unwrap();
    fs::write(&trash, b"in the way").unwrap();
    let e = store.delete_stream("e").unwrap_err();
    assert!(e.public().contains("trash"), "{}", e.public());
    assert!(!e.public().contains(&*dir.path().to_string_lossy()));
    // Still there, and still logging.
    feed(&mut s, &mut ss, &[batch(6, 2)]);
    drop(ss);
    let (r, _) = recovered(&store, "e");
    assert_eq!(state(&r), state(&s));
    fs::remove_file(&trash).unwrap();
    fs::create_dir(&trash).unwrap();
    store.delete_stream("e").unwrap();
    assert!(store.stream_names().unwrap().is_empty());
}

#[test]
fn directories_that_are_not_stream_names_are_skipped_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), config()).unwrap();
    store.create_stream("good", &options()).unwrap();
    for bad in ["bad name!", "new\nline", "..."] {
        fs::create_dir_all(dir.path().join("streams").join(bad)).unwrap();
    }
    assert_eq!(
        store.stream_names().unwrap(),
        vec!["...".to_owned(), "good".to_owned()]
    );
    assert!(dir.path().join("streams/bad name!").exists());
}
