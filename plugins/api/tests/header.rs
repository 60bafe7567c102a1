//! The C header is in sync with the Rust ABI: a C program compiled against
//! `include/baton_plugin.h` prints every size, offset and constant, and they must equal
//! the Rust definitions.

use baton_plugin::abi::*;
use std::mem::{offset_of, size_of};
use std::process::Command;

macro_rules! fields {
    ($out:ident, $rust:ty, $c:literal, [$($field:ident),+ $(,)?]) => {
        $out.push((format!("sizeof({})", $c), size_of::<$rust>() as u64));
        $($out.push((format!("offsetof({}, {})", $c, stringify!($field)), offset_of!($rust, $field) as u64));)+
    };
}

#[test]
fn c_header_matches_the_rust_abi() {
    let mut expected: Vec<(String, u64)> = Vec::new();
    fields!(expected, BatonStr, "baton_str_t", [ptr, len]);
    fields!(expected, BatonHeader, "baton_header_t", [name, value]);
    fields!(expected, BatonParam, "baton_param_t", [name, value]);
    fields!(
        expected,
        BatonRoute,
        "baton_route_t",
        [methods, reserved, path]
    );
    fields!(
        expected,
        BatonRequest,
        "baton_request_t",
        [
            struct_size,
            route,
            method,
            path,
            query,
            headers,
            headers_len,
            params,
            params_len,
            body,
            generation,
            worker_pid,
            reserved
        ]
    );
    fields!(
        expected,
        BatonHostApi,
        "baton_host_api_t",
        [
            struct_size,
            reserved,
            set_status,
            add_header,
            write_body,
            fail,
            set_error
        ]
    );
    fields!(
        expected,
        BatonInit,
        "baton_init_t",
        [
            struct_size,
            reserved,
            host,
            settings_json,
            generation,
            worker_pid,
            reserved2,
            error
        ]
    );
    fields!(
        expected,
        BatonPluginV1,
        "baton_plugin_v1_t",
        [
            magic,
            abi_major,
            abi_minor,
            struct_size,
            flags,
            name,
            version,
            routes,
            routes_len,
            init,
            handle,
            shutdown
        ]
    );
    expected.push(("BATON_PLUGIN_MAGIC".into(), MAGIC));
    expected.push(("BATON_ABI_MAJOR".into(), ABI_MAJOR.into()));
    expected.push(("BATON_ABI_MINOR".into(), ABI_MINOR.into()));
    expected.push(("BATON_FLAG_NONBLOCKING".into(), FLAG_NONBLOCKING.into()));
    for (bit, name) in method::NAMES {
        expected.push((format!("BATON_{name}"), bit.into()));
    }

    let dir = tempfile_dir();
    let source = dir.join("layout.c");
    let mut c = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include \"baton_plugin.h\"\nint main(void) {\n",
    );
    for (expr, _) in &expected {
        c += &format!("    printf(\"%llu\\n\", (unsigned long long)({expr}));\n");
    }
    c += "    return 0;\n}\n";
    std::fs::write(&source, c).unwrap();
    let binary = dir.join("layout");
    let include = concat!(env!("CARGO_MANIFEST_DIR"), "/include");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Werror", "-I", include, "-o"])
        .arg(&binary)
        .arg(&source)
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {cc:?}: {e}"));
    assert!(status.success(), "the header does not compile");
    let out = Command::new(&binary).output().unwrap();
    let printed: Vec<u64> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(printed.len(), expected.len());
    for ((expr, rust), c) in expected.iter().zip(printed) {
        assert_eq!(*rust, c, "{expr}: Rust says {rust}, the C header says {c}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("baton-header-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
