//! `enrollment`: runs the enrollment service (`serve`, the default) or applies its
//! migrations (`migrate`). Configuration comes from flags or environment.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    trainingkeys_shared::cli::main::<trainingkeys_enrollment::Application>().await
}
