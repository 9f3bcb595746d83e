//! credyt-proxy's entry point: parse the command line and run it (see `cli`).

#[actix_web::main]
async fn main() -> std::process::ExitCode {
    credyt_proxy::cli::run().await
}
