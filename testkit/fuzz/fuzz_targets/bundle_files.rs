//! Any deploy file set (paths and contents split out of the input): validation never panics,
//! and a set it accepts holds only normalised relative paths that cannot leave the build
//! directory, within the file and byte limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_bundler::{Limits, SourceFiles, normalize_path};

fuzz_target!(|data: &[u8]| {
    // `path \0 content \0 path \0 content …`
    let parts: Vec<&[u8]> = data.split(|&b| b == 0).collect();
    let files: Vec<(String, Vec<u8>)> = parts
        .chunks(2)
        .map(|c| {
            (
                String::from_utf8_lossy(c[0]).into_owned(),
                c.get(1).map(|b| b.to_vec()).unwrap_or_default(),
            )
        })
        .collect();
    let limits = Limits {
        max_files: 20,
        max_source_bytes: 4096,
        ..Limits::default()
    };
    let Ok(set) = SourceFiles::new(files, &limits) else {
        return;
    };
    assert!(set.len() <= limits.max_files && set.total_bytes() <= limits.max_source_bytes);
    for (path, _) in set.iter() {
        assert!(!path.is_empty() && !path.starts_with('/') && !path.contains('\\'), "{path:?}");
        assert!(path.split('/').all(|s| !s.is_empty() && s != "." && s != ".."), "{path:?}");
        assert_eq!(normalize_path(path).ok().as_deref(), Some(path), "{path:?}");
    }
});
