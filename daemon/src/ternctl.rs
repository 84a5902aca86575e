//! `ternctl`; the program is [`ternd::ctl`], which `ternd` also runs when called `ternctl`.

fn main() -> std::process::ExitCode {
    ternd::ctl::main()
}
