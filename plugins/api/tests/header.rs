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
            reserved,
            body_stream
        ]
    );
    fields!(
        expected,
        BatonRouteExt,
        "baton_route_ext_t",
        [kind, flags, max_body_bytes]
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
            set_error,
            defer,
            stream_set_status,
            stream_add_header,
            stream_send_head,
            stream_write,
            stream_on_writable,
            stream_finish,
            stream_fail,
            stream_is_open,
            body_read,
            body_on_readable,
            ws_send,
            ws_close
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
            shutdown,
            route_ext,
            on_drain,
            ws_open,
            ws_message,
            ws_close
        ]
    );
    expected.push(("BATON_PLUGIN_MAGIC".into(), MAGIC));
    expected.push(("BATON_ABI_MAJOR".into(), ABI_MAJOR.into()));
    expected.push(("BATON_ABI_MINOR".into(), ABI_MINOR.into()));
    expected.push(("BATON_FLAG_NONBLOCKING".into(), FLAG_NONBLOCKING.into()));
    for (bit, name) in method::NAMES {
        expected.push((format!("BATON_{name}"), bit.into()));
    }
    // 1.1. Negative codes are compared as their two's complement.
    for (name, code) in [
        ("BATON_OK", BATON_OK),
        ("BATON_E_INVALID", BATON_E_INVALID),
        ("BATON_E_WOULD_BLOCK", BATON_E_WOULD_BLOCK),
        ("BATON_E_CLOSED", BATON_E_CLOSED),
        ("BATON_E_TOO_LARGE", BATON_E_TOO_LARGE),
        ("BATON_E_STATE", BATON_E_STATE),
    ] {
        expected.push((name.into(), code as u64));
    }
    expected.push((
        "sizeof(baton_handle_t)".into(),
        size_of::<BatonHandle>() as u64,
    ));
    expected.push(("BATON_WRITE_BLOCK".into(), WRITE_BLOCK.into()));
    expected.push(("BATON_ROUTE_HTTP".into(), ROUTE_HTTP.into()));
    expected.push(("BATON_ROUTE_WEBSOCKET".into(), ROUTE_WEBSOCKET.into()));
    expected.push(("BATON_ROUTE_STREAM_BODY".into(), ROUTE_STREAM_BODY.into()));
    expected.push(("BATON_WS_TEXT".into(), ws::TEXT.into()));
    expected.push(("BATON_WS_BINARY".into(), ws::BINARY.into()));
    // What a 1.0 plugin or host declares: the offsets where 1.1 begins.
    expected.push((
        "offsetof(baton_plugin_v1_t, route_ext)".into(),
        DESCRIPTOR_SIZE_1_0 as u64,
    ));
    expected.push((
        "offsetof(baton_host_api_t, defer)".into(),
        HOST_API_SIZE_1_0 as u64,
    ));
    expected.push((
        "offsetof(baton_request_t, body_stream)".into(),
        REQUEST_SIZE_1_0 as u64,
    ));

    let include = concat!(env!("CARGO_MANIFEST_DIR"), "/include");
    let exprs: Vec<&str> = expected.iter().map(|(e, _)| e.as_str()).collect();
    let printed = c_values(include, "current", &exprs);
    for ((expr, rust), c) in expected.iter().zip(printed) {
        assert_eq!(*rust, c, "{expr}: Rust says {rust}, the C header says {c}");
    }
}

/// The frozen 1.0 header (tests/harness/abi-1.0) is a prefix of 1.1: every 1.0 struct has
/// the size 1.1 says 1.0 had, every 1.0 field sits where it does in 1.1, and the 1.0
/// constants are unchanged.
#[test]
fn the_frozen_1_0_header_is_a_prefix_of_1_1() {
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
        BatonInit,
        "baton_init_t",
        [host, settings_json, error]
    );
    let offsets_1_0 = [
        (
            "baton_request_t",
            offset_of!(BatonRequest, generation),
            "generation",
        ),
        (
            "baton_request_t",
            offset_of!(BatonRequest, reserved),
            "reserved",
        ),
        (
            "baton_host_api_t",
            offset_of!(BatonHostApi, set_error),
            "set_error",
        ),
        ("baton_plugin_v1_t", offset_of!(BatonPluginV1, init), "init"),
        (
            "baton_plugin_v1_t",
            offset_of!(BatonPluginV1, shutdown),
            "shutdown",
        ),
    ];
    for (ty, offset, field) in offsets_1_0 {
        expected.push((format!("offsetof({ty}, {field})"), offset as u64));
    }
    expected.push((
        "sizeof(baton_plugin_v1_t)".into(),
        DESCRIPTOR_SIZE_1_0 as u64,
    ));
    expected.push(("sizeof(baton_host_api_t)".into(), HOST_API_SIZE_1_0 as u64));
    expected.push(("sizeof(baton_request_t)".into(), REQUEST_SIZE_1_0 as u64));
    expected.push(("BATON_PLUGIN_MAGIC".into(), MAGIC));
    expected.push(("BATON_ABI_MAJOR".into(), ABI_MAJOR.into()));
    expected.push(("BATON_ABI_MINOR".into(), 0));
    expected.push(("BATON_FLAG_NONBLOCKING".into(), FLAG_NONBLOCKING.into()));
    for (bit, name) in method::NAMES {
        expected.push((format!("BATON_{name}"), bit.into()));
    }
    let include = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/harness/abi-1.0");
    let exprs: Vec<&str> = expected.iter().map(|(e, _)| e.as_str()).collect();
    let printed = c_values(include, "frozen-1.0", &exprs);
    for ((expr, rust), c) in expected.iter().zip(printed) {
        assert_eq!(
            *rust, c,
            "{expr}: 1.1 says {rust}, the frozen 1.0 header says {c}"
        );
    }
}

/// Compiles a C program against `baton_plugin.h` in `include` that prints each of
/// `exprs`, runs it, and returns what it printed.
fn c_values(include: &str, tag: &str, exprs: &[&str]) -> Vec<u64> {
    let dir = tempfile_dir(tag);
    let source = dir.join("layout.c");
    let mut c = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include \"baton_plugin.h\"\nint main(void) {\n",
    );
    for expr in exprs {
        c += &format!("    printf(\"%llu\\n\", (unsigned long long)({expr}));\n");
    }
    c += "    return 0;\n}\n";
    std::fs::write(&source, c).unwrap();
    let binary = dir.join("layout");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Werror", "-I", include, "-o"])
        .arg(&binary)
        .arg(&source)
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {cc:?}: {e}"));
    assert!(status.success(), "the header in {include} does not compile");
    let out = Command::new(&binary).output().unwrap();
    let printed: Vec<u64> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(printed.len(), exprs.len());
    let _ = std::fs::remove_dir_all(&dir);
    printed
}

fn tempfile_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("baton-header-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
