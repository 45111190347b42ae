//! What clients learn about the export: size, transmission flags, block
//! sizes, the export list, and block status (`nbdinfo --json/--list/--map`).

use crate::common::*;

#[test]
fn nbdinfo_json_shows_size_and_transmission_flags() {
    require(&["nbdinfo", "mkfs.ext4"]);
    let dir = TestDir::new("flags");
    let server = Server::unix(&dir, &["64M"]);
    let (doc, export) = nbdinfo_json(server.uri());
    let shown = format!("{export:#?}");

    assert_eq!(
        doc["protocol"].as_str(),
        Some("newstyle-fixed"),
        "the handshake must be fixed newstyle"
    );
    assert_eq!(
        doc["structured"].as_bool(),
        Some(true),
        "structured replies must be negotiated"
    );
    assert_eq!(
        export["export-size"].as_u64(),
        Some(64 * MIB),
        "export size must be exactly 64 MiB:\n{shown}"
    );
    for (key, want) in [
        ("is_read_only", false),
        ("can_trim", true),
        ("can_zero", true),
        ("can_fast_zero", true),
        ("can_flush", true),
        ("can_fua", true),
        // Each connection has its own disk: multi-conn would be a lie.
        ("can_multi_conn", false),
    ] {
        assert_eq!(
            export[key].as_bool(),
            Some(want),
            "nbdinfo --json must show {key}: {want}:\n{shown}"
        );
    }

    let contexts: Vec<&str> = export["contexts"]
        .as_array()
        .unwrap_or_else(|| panic!("no contexts list:\n{shown}"))
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    assert!(
        contexts.contains(&"base:allocation"),
        "base:allocation must be offered, got {contexts:?}"
    );

    let max = export["block_size_maximum"].as_u64();
    assert_eq!(
        max,
        Some(32 * MIB),
        "maximum block size (payload) must be 32 MiB:\n{shown}"
    );
    let min = export["block_size_minimum"]
        .as_u64()
        .unwrap_or_else(|| panic!("block_size_minimum missing:\n{shown}"));
    let pref = export["block_size_preferred"]
        .as_u64()
        .unwrap_or_else(|| panic!("block_size_preferred missing:\n{shown}"));
    assert!(
        min.is_power_of_two() && pref.is_power_of_two() && min <= pref && pref <= 32 * MIB,
        "block sizes must be powers of two with min {min} <= preferred {pref} <= max"
    );
}

#[test]
fn list_shows_one_default_export_with_description() {
    require(&["nbdinfo", "mkfs.ext4"]);
    let dir = TestDir::new("list");
    let server = Server::unix(&dir, &["1G"]);
    let text = nbdinfo_ok(&["--list", "--json", server.uri()]);
    let doc = json::parse(&text).unwrap_or_else(|e| panic!("nbdinfo --list --json: {e}\n{text}"));
    let exports = doc["exports"].as_array().expect("exports array");
    assert_eq!(
        exports.len(),
        1,
        "LIST must show exactly one export:\n{text}"
    );
    assert_eq!(
        exports[0]["export-name"].as_str(),
        Some(""),
        "the listed export must be the default one (\"\"):\n{text}"
    );
    let description = exports[0]["description"]
        .as_str()
        .unwrap_or_else(|| panic!("the export must have a description:\n{text}"));
    assert!(
        description.contains("ext4"),
        "the description must name the filesystem, got {description:?}"
    );
    assert_eq!(
        exports[0]["export-size"].as_u64(),
        Some(GIB),
        "listed export size:\n{text}"
    );
}

#[test]
fn any_export_name_is_accepted() {
    require(&["nbdinfo", "mkfs.ext4"]);
    let dir = TestDir::new("names");
    let server = Server::unix(&dir, &["64M"]);
    let sock = dir.join("nbd.sock");
    for name in ["disk", "some/other%20name"] {
        let uri = format!("nbd+unix:///{name}?socket={}", sock.display());
        let size = nbdinfo_ok(&["--size", &uri]);
        assert_eq!(
            size.trim(),
            (64 * MIB).to_string(),
            "export name {name:?} must be served like the default"
        );
    }
    drop(server);
}

#[test]
fn size_forms_and_environment() {
    require(&["python3-nbd"]);
    let dir = TestDir::new("sizes");
    let images = dir.subdir("images");
    // --command true leaves the image as created, so any size works fast.
    // (arguments, environment, expected size)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], u64);
    let cases: &[Case] = &[
        (&["1073741824"], &[], GIB),
        (&["512K"], &[], 512 * KIB),
        (&["64M"], &[], 64 * MIB),
        (&["1G"], &[], GIB),
        (&["2T"], &[], 2 << 40),
        (&["10GiB"], &[], 10 * GIB),
        (&["--size", "64M"], &[], 64 * MIB),
        (&[], &[("TMPDISK_SIZE", "3M")], 3 * MIB),
        // The command line wins over the environment (the unit sets
        // TMPDISK_SIZE): before, --size conflicted with it.
        (&["--size", "64M"], &[("TMPDISK_SIZE", "3M")], 64 * MIB),
        (&["5M"], &[("TMPDISK_SIZE", "3M")], 5 * MIB),
    ];
    let mut py_cases = String::from("[");
    for (args, env, want) in cases {
        let args: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
        let env: Vec<String> = env.iter().map(|(k, v)| format!("{k:?}: {v:?}")).collect();
        py_cases += &format!("([{}], {{{}}}, {want}),", args.join(", "), env.join(", "));
    }
    py_cases += "]";
    let script = format!(
        r#"
tmpdisk, tmpdir = sys.argv[1], sys.argv[2]
for args, env, want in {py_cases}:
    os.environ.pop("TMPDISK_SIZE", None)
    os.environ.update(env)
    h = nbd.NBD()
    h.connect_command([tmpdisk, "--stdio", "--tmpdir", tmpdir, "--command", "true"] + args)
    got = h.get_size()
    h.shutdown()
    del h  # closes the handle; libnbd reaps tmpdisk
    check(got == want, "size args %r env %r: served %d bytes, expected %d" % (args, env, got, want))
"#
    );
    run_ok(
        "python size checks",
        python(&script, &[TMPDISK, images.to_str().unwrap()]),
    );
    assert_dir_empty(&images, "after the size checks");
}

#[test]
fn block_status_shows_holes_data_and_trim() {
    require(&["nbdinfo", "python3-nbd", "mkfs.ext4"]);
    let dir = TestDir::new("map");
    let server = Server::unix(&dir, &["1G"]);

    // A fresh ext4 disk is mostly unwritten: mostly holes.
    let map_text = nbdinfo_ok(&["--map", server.uri()]);
    let map = parse_map(&map_text);
    let total: u64 = map.iter().map(|e| e.length).sum();
    assert_eq!(total, GIB, "the map must cover the disk:\n{map_text}");
    let data: u64 = map
        .iter()
        .filter(|e| e.flags & 1 == 0)
        .map(|e| e.length)
        .sum();
    assert!(
        data * 10 < total,
        "a fresh 1 GiB ext4 disk must be mostly holes, but {data} bytes are data:\n{map_text}"
    );
    assert!(
        map.iter().any(|e| e.flags == 3),
        "unwritten areas must be reported as hole,zero (3):\n{map_text}"
    );
    assert!(
        map.iter().any(|e| e.flags & 1 == 0),
        "the filesystem metadata must be reported as data:\n{map_text}"
    );

    // Write, check data; trim, check hole; all in one connection (the next
    // connection would get a fresh disk).
    let script = r#"
h = connect(sys.argv[1])
W, L = 768 << 20, 1 << 20
before = flags_over(h, W, L)
check(all(f & 1 for f in before), "precondition: fresh ext4 leaves 768M..769M unwritten, got flags %r" % before)
h.pwrite(b"\x5a" * L, W)
after = extents(h, W, L)
check(all(f & 3 == 0 for (_, _, f) in after), "after writing 1 MiB the range must be data, got %r" % after)
check(h.pread(L, W) == b"\x5a" * L, "read back after write")
h.trim(L, W)
trimmed = extents(h, W, L)
check(all(f & 3 for (_, _, f) in trimmed), "after TRIM the range must be a hole or zero, got %r" % trimmed)
check(h.pread(L, W) == bytes(L), "a trimmed range must read as zeroes")
h.shutdown()
"#;
    run_ok(
        "python block status",
        python(script, &[server.uri().to_string()]),
    );
}
