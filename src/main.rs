//! The `fieldgate` binary: parse the command line and hand over to [`fieldgate::cli`].

fn main() -> std::process::ExitCode {
    fieldgate::cli::main()
}
