//! The use cases behind each RPC: validated command in, wire message out.
//! This is where the store, the key material and the enrollment service meet.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::Utc;
use tokio::sync::mpsc;
use trainingkeys_proto::v1 as pb;
use trainingkeys_shared::page::{self, Cursor};
use uuid::Uuid;

use crate::code::Entropy;
use crate::domain::{
    ClassInfo, Consumed, GenerateClassKeys, GenerateSubscription, KeyRow, KeyUse, PoolChoice,
    Scope, SetEventKey, Status, UseOfKey,
};
use crate::enrollment::Enrollment;
use crate::error::Error;
use crate::export;
use crate::generate::{self, Batch};
use crate::render::{self, Placeholder};
use crate::secrets::Keyring;
use crate::store::{ScopeWindow, Store};

/// COPY chunks in flight between the generator thread and the database.
const GENERATION_QUEUE: usize = 4;

/// Everything the handlers need; cheap to clone.
#[derive(Clone)]
pub struct KeyService {
    /// This service's tables.
    store: Store,
    /// The enrollment service.
    enrollment: Enrollment,
    /// The code secrets.
    keyring: Arc<Keyring>,
}

impl KeyService {
    /// The service over its store, the enrollment client and the secrets.
    pub fn new(store: Store, enrollment: Enrollment, keyring: Arc<Keyring>) -> Self {
        Self {
            store,
            enrollment,
            keyring,
        }
    }

    /// The decrypted display code of a stored key.
    fn code_of(&self, row: &KeyRow) -> Result<String, Error> {
        Ok(self
            .keyring
            .open(row.key_id, row.cipher_key_id, &row.code_cipher)?)
    }

    /// The class of a class key (`None` for subscription keys).
    async fn class_of(&self, row: &KeyRow) -> Result<Option<ClassInfo>, Error> {
        match row.class_id {
            Some(class_id) => Ok(Some(self.enrollment.class(class_id).await?)),
            None => Ok(None),
        }
    }

    /// A key with its code, window (from the class's current dates) and uses.
    async fn describe(&self, row: &KeyRow) -> Result<pb::Key, Error> {
        let class = self.class_of(row).await?;
        let uses = self.store.uses_of(&[row.key_id]).await?;
        Ok(row.to_pb(self.code_of(row)?, class.as_ref(), uses, Utc::now()))
    }

    /// GenerateSubscriptionKeys: one transaction creating (or locking) the
    /// pool and streaming the keys in with COPY while a blocking thread
    /// generates them.
    pub async fn generate_subscription_keys(
        &self,
        cmd: GenerateSubscription,
    ) -> Result<pb::GenerateSubscriptionKeysResponse, Error> {
        self.enrollment.profile_organization(cmd.profile_id).await?;
        let (mut tx, pool) = self
            .store
            .begin_generation(cmd.profile_id, &cmd.pool)
            .await?;
        let max_uses = match cmd.pool {
            PoolChoice::Existing(_) => pool.uses_per_key,
            PoolChoice::New { uses_per_key, .. } => uses_per_key,
        };
        // Microsecond precision, as PostgreSQL stores it, so page cursors match.
        let now = Utc::now();
        let created_at =
            chrono::DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now);
        let batch = Batch {
            pool_id: pool.pool_id,
            max_uses,
            created_at,
            count: cmd.count as usize,
        };
        let (sender, receiver) = mpsc::channel(GENERATION_QUEUE);
        let keyring = Arc::clone(&self.keyring);
        let producer = tokio::task::spawn_blocking(move || {
            generate::subscription_chunks(&keyring, batch, &sender)
        });
        let copied = Store::copy_keys(&mut tx, receiver).await;
        producer.await?;
        let copied = copied?;
        let pool = Store::finish_generation(tx, pool.pool_id, copied as i64).await?;
        tracing::info!(pool_id = %pool.pool_id, generated = copied, "subscription keys generated");
        Ok(pb::GenerateSubscriptionKeysResponse {
            pool: Some(pool.into()),
            generated: copied as i32,
        })
    }

    /// GenerateClassEnrollmentKeys: capped by the class's current maximum.
    pub async fn generate_class_keys(
        &self,
        cmd: GenerateClassKeys,
    ) -> Result<pb::GenerateClassEnrollmentKeysResponse, Error> {
        let class = self.enrollment.class(cmd.class_id).await?;
        let keyring = Arc::clone(&self.keyring);
        let count = cmd.count as usize;
        let made = tokio::task::spawn_blocking(move || {
            let mut entropy = Entropy::new();
            (0..count)
                .map(|_| generate::generated(&keyring, &mut entropy))
                .collect::<Result<Vec<_>, _>>()
        })
        .await??;
        let (keys, codes): (Vec<_>, Vec<_>) = made.into_iter().unzip();
        let codes: HashMap<Uuid, String> = keys.iter().map(|k| k.key_id).zip(codes).collect();
        let rows = self
            .store
            .insert_class_keys(
                class.class_id,
                class.max_students,
                &keys,
                self.keyring.cipher_id(),
            )
            .await?;
        let now = Utc::now();
        let keys = rows
            .iter()
            .map(|row| {
                row.to_pb(
                    codes.get(&row.key_id).cloned().unwrap_or_default(),
                    Some(&class),
                    Vec::new(),
                    now,
                )
            })
            .collect();
        Ok(pb::GenerateClassEnrollmentKeysResponse { keys })
    }

    /// SetEventKey: a generated or custom code, retiring the previous key.
    pub async fn set_event_key(&self, cmd: SetEventKey) -> Result<pb::SetEventKeyResponse, Error> {
        let class = self.enrollment.class(cmd.class_id).await?;
        let mut entropy = Entropy::new();
        let (key, code, hashes) = match &cmd.custom {
            Some(custom) => {
                let key = generate::custom(&self.keyring, &mut entropy, custom)?;
                let hashes = self.keyring.lookup_hashes(custom.normalized.as_bytes());
                (key, custom.display.clone(), Some(hashes))
            }
            None => {
                let (key, code) = generate::generated(&self.keyring, &mut entropy)?;
                (key, code, None)
            }
        };
        let (row, replaced) = self
            .store
            .set_event_key(
                class.class_id,
                &key,
                self.keyring.cipher_id(),
                cmd.redeemable_after_class_end,
                hashes.as_deref(),
            )
            .await?;
        tracing::info!(class_id = %class.class_id, key_id = %row.key_id, custom = cmd.custom.is_some(), "event key set");
        Ok(pb::SetEventKeyResponse {
            key: Some(row.to_pb(code, Some(&class), Vec::new(), Utc::now())),
            replaced_key_id: replaced.map(|id| id.to_string()).unwrap_or_default(),
        })
    }

    /// DisableEventKey: idempotent.
    pub async fn disable_event_key(
        &self,
        class_id: Uuid,
    ) -> Result<pb::DisableEventKeyResponse, Error> {
        let class = self.enrollment.class(class_id).await?;
        let key = match self.store.disable_event_key(class_id).await? {
            Some(row) => {
                let uses = self.store.uses_of(&[row.key_id]).await?;
                Some(row.to_pb(self.code_of(&row)?, Some(&class), uses, Utc::now()))
            }
            None => None,
        };
        Ok(pb::DisableEventKeyResponse { key })
    }

    /// Class `class_id` as enrollment has it now (its organization owns
    /// its keys).
    pub async fn class(&self, class_id: Uuid) -> Result<crate::domain::ClassInfo, Error> {
        self.enrollment.class(class_id).await
    }

    /// The organization of profile `profile_id`.
    pub async fn profile_organization(&self, profile_id: Uuid) -> Result<String, Error> {
        self.enrollment.profile_organization(profile_id).await
    }

    /// The organization of pool `pool_id` (its profile's, as of its keys).
    pub async fn pool_organization(&self, pool_id: Uuid) -> Result<String, Error> {
        let pool = self.store.pool(pool_id).await?;
        self.enrollment.profile_organization(pool.profile_id).await
    }

    /// Most revealing probes of the code space a caller may make per hour
    /// (custom codes found taken: uniqueness is global, so each tells that
    /// some organization uses the code; look-ups by code that find nothing
    /// the caller may see): beyond, it may do neither for a while.
    const TAKEN_CODES_PER_HOUR: i64 = 10;

    /// SetEventKey for a caller outside the project (`subject`): a custom
    /// code counts as an attempt, kept when the code was taken.
    pub async fn set_event_key_as(
        &self,
        cmd: SetEventKey,
        subject: Option<&str>,
    ) -> Result<pb::SetEventKeyResponse, Error> {
        let Some(subject) = subject.filter(|_| cmd.custom.is_some()) else {
            return self.set_event_key(cmd).await;
        };
        let probe = self.start_probe(subject).await?;
        let answer = self.set_event_key(cmd).await;
        self.end_probe(probe, matches!(answer, Err(Error::CodeTaken)))
            .await?;
        answer
    }

    /// Starts a probe of the code space by a caller outside the project
    /// (a custom code that may be taken, a look-up by code that may miss):
    /// refused once `subject`'s revealing probes of the last hour reach the
    /// limit.
    pub async fn start_probe(&self, subject: &str) -> Result<Uuid, Error> {
        let probe = Uuid::new_v4();
        if self.store.count_code_attempt(subject, probe).await? > Self::TAKEN_CODES_PER_HOUR {
            self.store.forget_code_attempt(probe).await?;
            return Err(Error::TooManyTakenCodes);
        }
        Ok(probe)
    }

    /// Ends a probe: kept (counted) when its answer revealed something
    /// about codes the caller does not own.
    pub async fn end_probe(&self, probe: Uuid, revealing: bool) -> Result<(), Error> {
        if revealing {
            Ok(())
        } else {
            self.store.forget_code_attempt(probe).await
        }
    }

    /// GetKey by id.
    pub async fn get_key_by_id(&self, key_id: Uuid) -> Result<pb::Key, Error> {
        let row = self.store.key(key_id).await?;
        self.describe(&row).await
    }

    /// GetKey by (normalised) code.
    pub async fn get_key_by_code(&self, normalized: &str) -> Result<pb::Key, Error> {
        let row = self
            .store
            .key_by_code(&self.keyring.lookup_hashes(normalized.as_bytes()))
            .await?;
        self.describe(&row).await
    }

    /// The window of every key of a scope; checks the scope exists.
    pub async fn scope_window(&self, scope: Scope) -> Result<ScopeWindow, Error> {
        Ok(match scope {
            Scope::Class(class_id) => {
                ScopeWindow::of_class(&self.enrollment.class(class_id).await?)
            }
            Scope::Pool(pool_id) => ScopeWindow::of_pool(&self.store.pool(pool_id).await?),
        })
    }

    /// ExportKeys: checks the scope first (a missing class or pool is the
    /// call's status, not a broken stream), reading it once, then streams.
    pub async fn export(
        &self,
        scope: Scope,
        status: Option<Status>,
        hidden: Option<crate::domain::Kind>,
    ) -> Result<export::ExportStream, Error> {
        let (window, columns) = match scope {
            Scope::Class(class_id) => {
                let window = ScopeWindow::of_class(&self.enrollment.class(class_id).await?);
                (window, export::Columns::class(class_id, window))
            }
            Scope::Pool(pool_id) => {
                let pool = self.store.pool(pool_id).await?;
                (ScopeWindow::of_pool(&pool), export::Columns::pool(&pool))
            }
        };
        let source = export::Source {
            store: self.store.clone(),
            keyring: self.keyring.clone(),
            scope,
            window,
            columns,
            status,
            hidden,
        };
        Ok(export::start(source))
    }

    /// ListKeys: one page.
    pub async fn list_keys(
        &self,
        scope: Scope,
        status: Option<Status>,
        after: Option<Cursor>,
        limit: i64,
    ) -> Result<pb::ListKeysResponse, Error> {
        let class = match scope {
            Scope::Class(class_id) => Some(self.enrollment.class(class_id).await?),
            Scope::Pool(_) => None,
        };
        let window = match &class {
            Some(c) => ScopeWindow {
                from: None,
                until: Some(c.end_time),
                lab_until: Some(c.lab_access_end_time),
            },
            None => self.scope_window(scope).await?,
        };
        let now = Utc::now();
        let rows = self
            .store
            .list(scope, window, status, now, after, limit)
            .await?;
        let next_page_token = page::next_token(&rows, limit, |k| Cursor {
            time: k.created_at,
            id: k.key_id,
        });
        let ids: Vec<Uuid> = rows.iter().map(|r| r.key_id).collect();
        let mut uses: HashMap<Uuid, Vec<KeyUse>> = HashMap::new();
        for u in self.store.uses_of(&ids).await? {
            uses.entry(u.key_id).or_default().push(u);
        }
        let keys = rows
            .iter()
            .map(|row| {
                let code = self.code_of(row)?;
                Ok(row.to_pb(
                    code,
                    class.as_ref(),
                    uses.remove(&row.key_id).unwrap_or_default(),
                    now,
                ))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(pb::ListKeysResponse {
            keys,
            next_page_token,
        })
    }

    /// RevokeKey: idempotent.
    pub async fn revoke_key(&self, key_id: Uuid) -> Result<pb::RevokeKeyResponse, Error> {
        let (row, already_revoked) = self.store.revoke(key_id).await?;
        if !already_revoked {
            tracing::info!(%key_id, "key revoked");
        }
        Ok(pb::RevokeKeyResponse {
            key: Some(self.describe(&row).await?),
            already_revoked,
        })
    }

    /// RenderNotification: the template is checked before any lookup.
    pub async fn render_notification(
        &self,
        class_id: Uuid,
        template: &str,
    ) -> Result<String, Error> {
        let pieces = render::parse(template)?;
        let class = self.enrollment.class(class_id).await?;
        let event_code = if render::uses(&pieces, Placeholder::EventTrainingKey) {
            let row = self
                .store
                .event_key(class_id)
                .await?
                .ok_or(Error::NoEventKey(class_id))?;
            self.code_of(&row)?
        } else {
            String::new()
        };
        let when = |t: chrono::DateTime<Utc>| t.format("%Y-%m-%d %H:%M UTC").to_string();
        Ok(render::render(&pieces, |p| match p {
            Placeholder::EventTrainingKey => event_code.clone(),
            Placeholder::ClassTitle => class.title.clone(),
            Placeholder::ClassStart => when(class.start_time),
            Placeholder::ClassEnd => when(class.end_time),
        }))
    }

    /// ResolveKey: no call to enrollment (the caller checks class windows).
    pub async fn resolve_key(
        &self,
        normalized: &str,
        user_id: Option<Uuid>,
    ) -> Result<pb::ResolveKeyResponse, Error> {
        let row = self
            .store
            .key_by_code(&self.keyring.lookup_hashes(normalized.as_bytes()))
            .await?;
        let used_by_user = match user_id {
            Some(user_id) => self.store.used_by(row.key_id, user_id).await?,
            None => false,
        };
        Ok(pb::ResolveKeyResponse {
            key: Some(row.to_pb(self.code_of(&row)?, None, Vec::new(), Utc::now())),
            revoked: row.revoked_at.is_some(),
            used_by_user,
        })
    }

    /// ConsumeKey.
    pub async fn consume_key(&self, u: UseOfKey) -> Result<Consumed, Error> {
        self.store.consume(u).await
    }

    /// ReleaseKey.
    pub async fn release_key(&self, u: UseOfKey) -> Result<bool, Error> {
        self.store.release(u).await
    }
}
