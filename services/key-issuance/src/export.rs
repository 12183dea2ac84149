//! ExportKeys: RFC 4180 CSV streamed straight from a database cursor. Rows
//! are decrypted and written as they arrive, handed to gRPC in ~64 KiB chunks
//! through a small bounded channel: a slow client slows the database read
//! instead of growing memory, whatever the pool's size.

use std::sync::Arc;
use std::time::Instant;

use chrono::{SecondsFormat, Utc};
use futures::TryStreamExt as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use trainingkeys_proto::v1 as pb;
use uuid::Uuid;

use crate::domain::{Kind, Pool, Scope, Status};
use crate::error::Error;
use crate::secrets::Keyring;
use crate::store::{ExportRow, ScopeWindow, Store};

/// Bytes of CSV per streamed message.
const CHUNK_BYTES: usize = 64 * 1024;
/// Messages buffered between the database reader and gRPC.
const CHANNEL_CHUNKS: usize = 4;

/// The CSV header of an export.
pub const CSV_HEADER: [&str; 9] = [
    "code",
    "kind",
    "target",
    "pool",
    "status",
    "valid_until",
    "uses",
    "redeemed_by",
    "redeemed_at",
];

/// A time in exports.
pub fn csv_time(t: chrono::DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// The kind name of a stored kind number, for exports.
fn csv_kind(kind: i16) -> &'static str {
    Kind::from_code(kind).csv_name()
}

/// The stream ExportKeys returns.
pub type ExportStream = ReceiverStream<Result<pb::ExportKeysResponse, tonic::Status>>;

/// Fixed columns of every row of one export.
pub struct Columns {
    target: String,
    pool: String,
    valid_until: String,
    lab_until: String,
}

impl Columns {
    /// A class's keys.
    pub fn class(class_id: Uuid, window: ScopeWindow) -> Self {
        Self {
            target: class_id.to_string(),
            pool: String::new(),
            valid_until: window.until.map(csv_time).unwrap_or_default(),
            lab_until: window.lab_until.map(csv_time).unwrap_or_default(),
        }
    }

    /// A pool's keys.
    pub fn pool(pool: &Pool) -> Self {
        let until = pool.valid_until.map(csv_time).unwrap_or_default();
        Self {
            target: pool.profile_id.to_string(),
            pool: pool.pool_id.to_string(),
            valid_until: until.clone(),
            lab_until: until,
        }
    }
}

/// What one export reads: the scope (checked to exist), its window and
/// fixed columns, where the rows come from and how codes are opened.
pub struct Source {
    pub store: Store,
    pub keyring: Arc<Keyring>,
    pub scope: Scope,
    pub window: ScopeWindow,
    pub columns: Columns,
    pub status: Option<Status>,
    /// A kind of key the caller may not see (an operations manager's
    /// export of a class leaves its event key out).
    pub hidden: Option<crate::domain::Kind>,
}

/// Starts streaming an export.
pub fn start(source: Source) -> ExportStream {
    let (sender, receiver) = mpsc::channel(CHANNEL_CHUNKS);
    tokio::spawn(async move {
        let started = Instant::now();
        let scope = source.scope;
        match write(&source, &sender).await {
            Ok(Some(rows)) => {
                tracing::info!(?scope, rows, elapsed = ?started.elapsed(), "keys exported")
            }
            Ok(None) => tracing::info!(?scope, "export abandoned by the client"),
            Err(e) => {
                let _ = sender.send(Err(e.into())).await;
            }
        }
    });
    ReceiverStream::new(receiver)
}

type Sender = mpsc::Sender<Result<pb::ExportKeysResponse, tonic::Status>>;

/// Writes the CSV; `Ok(None)` when the client went away.
async fn write(source: &Source, sender: &Sender) -> Result<Option<u64>, Error> {
    let mut csv = writer();
    csv.write_record(CSV_HEADER)?;
    let mut rows = source.store.export_rows(
        source.scope,
        source.window,
        source.status,
        source.hidden,
        Utc::now(),
    );
    let mut count = 0u64;
    while let Some(row) = rows.try_next().await? {
        record(source, &row, &mut csv)?;
        count += 1;
        if csv.get_ref().len() >= CHUNK_BYTES && !flush(&mut csv, sender).await? {
            return Ok(None);
        }
    }
    if !flush(&mut csv, sender).await? {
        return Ok(None);
    }
    Ok(Some(count))
}

/// A CSV writer into a buffer with room for one chunk.
fn writer() -> csv::Writer<Vec<u8>> {
    csv::WriterBuilder::new()
        .buffer_capacity(16 * 1024)
        .from_writer(Vec::with_capacity(CHUNK_BYTES + 32 * 1024))
}

/// Sends what the writer holds; false when the client is gone.
async fn flush(csv: &mut csv::Writer<Vec<u8>>, sender: &Sender) -> Result<bool, Error> {
    // The writer owns its output: swap in a fresh one and take the bytes.
    let chunk = std::mem::replace(csv, writer())
        .into_inner()
        .map_err(|e| csv::Error::from(e.into_error()))?;
    if chunk.is_empty() {
        return Ok(true);
    }
    Ok(sender
        .send(Ok(pb::ExportKeysResponse { chunk }))
        .await
        .is_ok())
}

fn record(source: &Source, row: &ExportRow, csv: &mut csv::Writer<Vec<u8>>) -> Result<(), Error> {
    let columns = &source.columns;
    let code = source
        .keyring
        .open(row.key_id, row.cipher_key_id, &row.code_cipher)?;
    let valid_until = if row.redeemable_after_class_end {
        &columns.lab_until
    } else {
        &columns.valid_until
    };
    let join = |items: Option<Vec<String>>| items.map(|v| v.join(";")).unwrap_or_default();
    let redeemed_by = join(
        row.redeemed_by
            .as_ref()
            .map(|v| v.iter().map(ToString::to_string).collect()),
    );
    let redeemed_at = join(
        row.redeemed_at
            .as_ref()
            .map(|v| v.iter().copied().map(csv_time).collect()),
    );
    let uses = row.uses.to_string();
    csv.write_record([
        code.as_str(),
        csv_kind(row.kind),
        &columns.target,
        &columns.pool,
        Status::from_code(row.status).csv_name(),
        valid_until,
        &uses,
        &redeemed_by,
        &redeemed_at,
    ])?;
    Ok(())
}
