//! `key-issuance`: runs the key issuance service (`serve`, the default) or
//! applies its migrations (`migrate`). Configuration comes from flags or
//! environment; the code secrets are required (see the crate's README).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    trainingkeys_shared::cli::main::<trainingkeys_key_issuance::Application>().await
}
