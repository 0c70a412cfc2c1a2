//! The `m40-llm` command: a thin layer over the library (one file per subcommand under cli/).

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
