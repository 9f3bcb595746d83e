//! credyt-proxy's entry point: parse the command line and run it (see `cli`).

/// mimalloc instead of glibc malloc: per-thread free lists without glibc's chunk consolidation
/// (which showed as ~14% of the request path's CPU in the load-test profile) and a smaller RSS.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[actix_web::main]
async fn main() -> std::process::ExitCode {
    credyt_proxy::cli::run().await
}
