//! ExportKeys: RFC 4180 CSV streamed straight from a database cursor. Rows
//! are decrypted and written as they arrive, handed to gRPC in ~64 KiB chunks
//! through a small bounded channel: a slow client slows the database read
//! instead of growing memory, whatever the pool's size.

use std::time::Instant;

use chrono::Utc;
use futures::TryStreamExt as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use trainingkeys_proto::v1 as pb;

use crate::domain::{Scope, Status};
use crate::error::Error;
use crate::service::{CSV_HEADER, KeyService, csv_kind, csv_time};
use crate::store::{ExportRow, ScopeWindow};

/// Bytes of CSV per streamed message.
const CHUNK_BYTES: usize = 64 * 1024;
/// Messages buffered between the database reader and gRPC.
const CHANNEL_CHUNKS: usize = 4;

/// The stream ExportKeys returns.
pub type ExportStream = ReceiverStream<Result<pb::ExportKeysResponse, tonic::Status>>;

/// Starts an export of `scope`. The scope is checked first, so a missing
/// class or pool is the call's status rather than a broken stream.
pub async fn start(
    service: KeyService,
    scope: Scope,
    status: Option<Status>,
) -> Result<ExportStream, Error> {
    let window = service.scope_window(scope).await?;
    let (sender, receiver) = mpsc::channel(CHANNEL_CHUNKS);
    tokio::spawn(async move {
        let started = Instant::now();
        match write(&service, scope, window, status, &sender).await {
            Ok(Some(rows)) => {
                tracing::info!(?scope, rows, elapsed = ?started.elapsed(), "keys exported")
            }
            Ok(None) => tracing::info!(?scope, "export abandoned by the client"),
            Err(e) => {
                let _ = sender.send(Err(e.into())).await;
            }
        }
    });
    Ok(ReceiverStream::new(receiver))
}

/// Fixed columns of every row of one export.
struct Columns {
    target: String,
    pool: String,
    valid_until: String,
    lab_until: String,
}

type Sender = mpsc::Sender<Result<pb::ExportKeysResponse, tonic::Status>>;

/// Writes the CSV; `Ok(None)` when the client went away.
async fn write(
    service: &KeyService,
    scope: Scope,
    window: ScopeWindow,
    status: Option<Status>,
    sender: &Sender,
) -> Result<Option<u64>, Error> {
    let columns = match scope {
        Scope::Class(class_id) => Columns {
            target: class_id.to_string(),
            pool: String::new(),
            valid_until: window.until.map(csv_time).unwrap_or_default(),
            lab_until: window.lab_until.map(csv_time).unwrap_or_default(),
        },
        Scope::Pool(pool_id) => {
            let pool = service.store.pool(pool_id).await?;
            let until = pool.valid_until.map(csv_time).unwrap_or_default();
            Columns {
                target: pool.profile_id.to_string(),
                pool: pool_id.to_string(),
                valid_until: until.clone(),
                lab_until: until,
            }
        }
    };
    let mut csv = writer();
    csv.write_record(CSV_HEADER)?;
    let mut rows = service.store.export_rows(scope, window, status, Utc::now());
    let mut count = 0u64;
    while let Some(row) = rows.try_next().await? {
        record(service, &columns, &row, &mut csv)?;
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

fn record(
    service: &KeyService,
    columns: &Columns,
    row: &ExportRow,
    csv: &mut csv::Writer<Vec<u8>>,
) -> Result<(), Error> {
    let code = service
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
