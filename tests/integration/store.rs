//! The `file://` store: staged writes, commit, abort, sweep, reads, copies and deletes.

use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;

use crate::support::data::chunks;
use crate::support::{file_store, files_under};

#[tokio::test]
async fn staged_writes_become_visible_only_when_committed() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(dir.path());
    let mut write = store.begin_write().await.unwrap();
    for chunk in chunks(1, 20 << 20, 1 << 20) {
        write.write(chunk).await.unwrap();
    }
    assert!(files_under(dir.path()).iter().all(|f| f.starts_with("staging")), "{:?}", files_under(dir.path()));
    let blob = write.commit("packages/ns/app/abc").await.unwrap();
    assert_eq!(blob.key, "packages/ns/app/abc");
    assert!(store.holds(&blob));
    assert_eq!(files_under(dir.path()), vec![std::path::PathBuf::from("packages/ns/app/abc")]);

    let (size, stream) = store.read("packages/ns/app/abc").await.unwrap();
    assert_eq!(size, 20 << 20);
    let read: Vec<Bytes> = stream.try_collect().await.unwrap();
    let expected: Vec<u8> = chunks(1, 20 << 20, 1 << 20).flat_map(|c| c.to_vec()).collect();
    assert_eq!(read.concat(), expected);
}

#[tokio::test]
async fn aborted_and_dropped_writes_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(dir.path());
    let mut write = store.begin_write().await.unwrap();
    write.write(Bytes::from(vec![7u8; 9 << 20])).await.unwrap();
    write.abort().await;
    let mut dropped = store.begin_write().await.unwrap();
    dropped.write(Bytes::from(vec![7u8; 9 << 20])).await.unwrap();
    drop(dropped);
    for _ in 0..50 {
        if files_under(dir.path()).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(files_under(dir.path()).is_empty(), "{:?}", files_under(dir.path()));
}

#[tokio::test]
async fn sweep_removes_what_a_killed_writer_left() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(dir.path());
    // What a killed process leaves: a part file in staging/.
    std::fs::create_dir_all(dir.path().join("staging")).unwrap();
    std::fs::write(dir.path().join("staging/0000-dead#1"), b"partial").unwrap();
    assert_eq!(store.sweep_staging(Duration::from_secs(3600)).await.unwrap(), 0, "recent writes are left alone");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(store.sweep_staging(Duration::from_millis(1)).await.unwrap(), 1);
    assert!(files_under(dir.path()).is_empty());
}

#[tokio::test]
async fn copy_delete_and_missing_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(dir.path());
    let mut write = store.begin_write().await.unwrap();
    write.write(Bytes::from_static(b"hello")).await.unwrap();
    write.commit("a/one").await.unwrap();
    store.copy("a/one", "b/two", 5).await.unwrap();
    assert_eq!(std::fs::read(dir.path().join("b/two")).unwrap(), b"hello");
    store.delete("a/one").await.unwrap();
    store.delete("a/one").await.unwrap();
    assert_eq!(store.size("b/two").await.unwrap(), 5);
    let missing = store.size("a/one").await.unwrap_err();
    assert!(matches!(missing, bitsmith::store::StoreError::NotFound { .. }), "{missing}");
    assert!(store.presigned_get("b/two", Duration::from_secs(60)).await.unwrap().is_none());
}
