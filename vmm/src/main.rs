//! The `trellis` command line.

fn main() {
    eprintln!("trellis: not built yet");
    std::process::exit(1);
}
