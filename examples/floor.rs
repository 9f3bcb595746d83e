//! The floor: the cheapest server that does what every proxy request must do at least once,
//! read the same request body and parse it as JSON, then answer. No authentication, pricing,
//! storage or upstream call. The load-test kit measures it (and nginx in front of it) beside the
//! proxy, with the same load tool at the same concurrency, so the proxy's figures can be read as
//! ratios to it.
//!
//! `cargo run --release --example floor -- 127.0.0.1:18090 [workers] [durable-dir]`
//!
//! Any `POST` parses its body as a JSON tree (the same `serde_json::Value` the proxy reads,
//! numbers kept as literal text) and answers `204`; a body that is not JSON gets `400`, so a
//! wrong request shape in the kit shows up as errors, not as a flattering figure.
//!
//! With a `durable-dir`, the **durable floor**: each parsed body is also appended to a journal
//! file in that folder and answered only once an `fdatasync` covered it, with group commit
//! (one thread writes everything that arrived since its last sync with one `pwrite` and syncs
//! it once, then answers all of it). The file is zero-filled and synced before the port opens
//! and written in a circle, so a sync writes data only, as with the proxy's preallocated log.
//! It is the cheapest server that answers after its request is on disk: the bound, on this
//! machine and disk, for the proxy's `sync = "always"`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use actix_web::{web, App, HttpResponse, HttpServer};
use parking_lot::{Condvar, Mutex};
use tokio::sync::oneshot;

/// Size of the durable floor's journal file, written in a circle.
const JOURNAL_BYTES: u64 = 64 << 20;

/// Bodies waiting for the next group, and whom to answer once it is synced.
#[derive(Default)]
struct Group {
    bytes: Vec<u8>,
    waiting: Vec<oneshot::Sender<()>>,
}

struct Journal {
    next: Mutex<Group>,
    arrived: Condvar,
}

impl Journal {
    /// Zero-fills the file, syncs it, and starts the thread that writes and syncs groups.
    fn open(dir: &Path) -> Arc<Journal> {
        std::fs::create_dir_all(dir).unwrap();
        let file = File::create(dir.join("floor.journal")).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for i in 0..JOURNAL_BYTES / zeros.len() as u64 {
            file.write_all_at(&zeros, i * zeros.len() as u64).unwrap();
        }
        file.sync_all().unwrap();
        let journal = Arc::new(Journal {
            next: Mutex::new(Group::default()),
            arrived: Condvar::new(),
        });
        let j = journal.clone();
        std::thread::Builder::new()
            .name("floor-sync".into())
            .spawn(move || j.run(file))
            .unwrap();
        journal
    }

    fn run(&self, file: File) {
        let mut at = 0u64;
        let mut spare = Group::default();
        loop {
            {
                let mut next = self.next.lock();
                while next.waiting.is_empty() {
                    self.arrived.wait(&mut next);
                }
                std::mem::swap(&mut *next, &mut spare);
            }
            let len = spare.bytes.len() as u64;
            if at + len > JOURNAL_BYTES {
                at = 0;
            }
            file.write_all_at(&spare.bytes, at).unwrap();
            file.sync_data().unwrap();
            at += len;
            spare.bytes.clear();
            for w in spare.waiting.drain(..) {
                let _ = w.send(());
            }
        }
    }

    /// Answers once `body` is durable.
    async fn append(&self, body: &[u8]) {
        let (tx, rx) = oneshot::channel();
        {
            let mut next = self.next.lock();
            next.bytes
                .extend_from_slice(&(body.len() as u32).to_le_bytes());
            next.bytes.extend_from_slice(body);
            next.waiting.push(tx);
            if next.waiting.len() == 1 {
                self.arrived.notify_one();
            }
        }
        rx.await
            .expect("the sync thread runs as long as the process");
    }
}

async fn parse(body: web::Bytes) -> HttpResponse {
    if is_object(&body) {
        HttpResponse::NoContent().finish()
    } else {
        invalid()
    }
}

async fn parse_durable(body: web::Bytes, journal: web::Data<Journal>) -> HttpResponse {
    if is_object(&body) {
        journal.append(&body).await;
        HttpResponse::NoContent().finish()
    } else {
        invalid()
    }
}

fn is_object(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| v.is_object())
}

fn invalid() -> HttpResponse {
    HttpResponse::BadRequest()
        .content_type("application/problem+json")
        .body(r#"{"status":400,"code":"invalid_json"}"#)
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:18090".to_string());
    let workers: usize = args
        .next()
        .map(|w| w.parse().expect("workers"))
        .unwrap_or(1);
    let journal = args.next().map(|dir| Journal::open(Path::new(&dir)));
    actix_web::rt::System::new().block_on(async move {
        let durable = if journal.is_some() { ", durable" } else { "" };
        let server = HttpServer::new(move || {
            let app = App::new().app_data(web::PayloadConfig::new(1024 * 1024));
            match &journal {
                Some(j) => app
                    .app_data(web::Data::from(j.clone()))
                    .default_service(web::post().to(parse_durable)),
                None => app.default_service(web::post().to(parse)),
            }
        })
        .workers(workers)
        .backlog(4096)
        .bind(&listen)?;
        eprintln!("floor listening on {listen} ({workers} worker{durable})");
        server.run().await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every answered body is in the journal, whole, once; concurrent appends share syncs.
    #[test]
    fn every_answered_body_is_in_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path());
        let bodies: Vec<Vec<u8>> = (0..200)
            .map(|i| format!(r#"{{"id":"e{i}","pad":"{}"}}"#, "x".repeat(i)).into_bytes())
            .collect();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let appends = bodies.iter().map(|b| journal.append(b));
            futures_util::future::join_all(appends).await;
        });
        let bytes = std::fs::read(dir.path().join("floor.journal")).unwrap();
        assert_eq!(bytes.len() as u64, JOURNAL_BYTES, "written in place");
        let mut found = Vec::new();
        let mut at = 0;
        loop {
            let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            if len == 0 {
                break;
            }
            found.push(bytes[at + 4..at + 4 + len].to_vec());
            at += 4 + len;
        }
        found.sort();
        let mut expected = bodies.clone();
        expected.sort();
        assert_eq!(found, expected);
    }
}
