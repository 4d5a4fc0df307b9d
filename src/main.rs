//! The `pg2ch` binary: everything lives in the library; see `pg2ch::cli`.

fn main() {
    std::process::exit(pg2ch::cli::main());
}
