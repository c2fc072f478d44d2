//! What the host's files hold after a run.

use std::path::Path;

/// Every file under `dir` (following no symlinks) that contains `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return found };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            found.extend(files_containing(&p, needle));
        } else if ft.is_file() {
            if let Ok(data) = std::fs::read(&p) {
                if data.windows(needle.len()).any(|w| w == needle) {
                    found.push(p.display().to_string());
                }
            }
        }
    }
    found
}
