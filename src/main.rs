//! The `m40-llm` command: a thin layer over the library (one file per subcommand under cli/).

mod cli;

fn main() -> std::process::ExitCode {
    // Rust ignores SIGPIPE, which turns `m40-llm inspect | head` into a "failed printing to
    // stdout" panic. Like other command-line tools, end quietly when the reader goes away.
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to the default before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    cli::main()
}
