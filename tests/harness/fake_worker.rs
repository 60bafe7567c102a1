//! A stand-in for `baton-worker` that fails on purpose, for rollback tests. The mode is
//! the first argument (tests start it through a one-line wrapper script):
//! - `exit`: writes to stderr and exits 3 before READY;
//! - `hang`: never says READY;
//! - `report`: reports a start-up failure over NOTIFY_SOCKET, then stays alive;
//! - `stubborn`: says READY but never accepts and blocks SIGTERM (only SIGKILL ends it).
#![forbid(unsafe_code)]

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    match mode.as_str() {
        "exit" => {
            eprintln!("fake worker: cannot open /nonexistent/data: giving up");
            std::process::exit(3);
        }
        "hang" => {
            eprintln!("fake worker: waiting forever before READY");
            sleep_bounded();
        }
        "report" => {
            notify(b"STATUS=failed: fake worker: database unreachable\nERRNO=5");
            sleep_bounded();
        }
        "old-protocol" => {
            // A worker of a release whose protocol this supervisor no longer speaks.
            notify(b"READY=1\nBATON_WORKER=0.0.1 0");
            sleep_bounded();
        }
        "stubborn" => {
            // Blocked in the only thread: SIGTERM stays pending and never ends the process.
            let mut term = nix::sys::signal::SigSet::empty();
            term.add(nix::sys::signal::Signal::SIGTERM);
            term.thread_block().expect("block SIGTERM");
            notify(b"READY=1");
            sleep_bounded();
        }
        other => {
            eprintln!("fake worker: unknown mode {other:?}");
            std::process::exit(2);
        }
    }
}

/// Sends one datagram to `NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace).
fn notify(message: &[u8]) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::SocketAddr;
    let target = std::env::var("NOTIFY_SOCKET").expect("NOTIFY_SOCKET is set by baton");
    let addr = match target.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(&target),
    }
    .expect("NOTIFY_SOCKET address");
    let sock = UnixDatagram::unbound().expect("datagram socket");
    sock.send_to_addr(message, &addr)
        .expect("send to NOTIFY_SOCKET");
}

/// Sleeps long enough for any test, but not forever if something forgets to kill us.
fn sleep_bounded() {
    std::thread::sleep(Duration::from_secs(300));
}
