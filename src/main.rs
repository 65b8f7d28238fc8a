//! The `cjepa` command line: parse, dispatch, print the error chain, exit
//! 0 (ok) / 1 (a stage failed) / 2 (usage, config, internal error) / 130 (interrupted).
//! A closed stdout (`cjepa ... | head -1`) ends the command quietly with 0 (`cli::stdout`).

mod cli;

fn main() {
    // Training steps reuse the same large buffers every step: keep freed memory mapped.
    cjepa::util::malloc::keep_freed_memory();
    let code = match cli::main() {
        Ok(code) => code,
        Err(e) if cli::stdout::is_closed(&e) => 0,
        Err(e) => {
            let code = e
                .downcast_ref::<cjepa::Error>()
                .map(|e| e.exit_code())
                .unwrap_or(2);
            eprintln!("error: {e:#}");
            code
        }
    };
    std::process::exit(code);
}
