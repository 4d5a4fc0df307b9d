//! The `pg2ch` binary: everything lives in the library; see `pg2ch::cli`.

/// mimalloc instead of glibc's malloc: pg2ch allocates and frees millions of
/// small buffers per million rows (driver rows, records, inserts), and a
/// profile showed about a third of its CPU in glibc's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(pg2ch::cli::main());
}
