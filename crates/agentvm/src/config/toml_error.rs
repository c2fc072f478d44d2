//! A TOML syntax or type error, told by its place in the file.

/// A TOML error as `line L, column C: message`. Not the `toml` crate's
/// own error, whose Display quotes the offending line: whatever a config
/// file holds (the guest may have written it, or it may be a link to a
/// host file) never reaches an error message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", place.map(|(line, column)| format!("line {line}, column {column}: ")).unwrap_or_default())]
pub struct TomlError {
    /// Line and column (from 1), when the parser knows them.
    pub place: Option<(usize, usize)>,
    /// The parser's message, control characters blanked.
    pub message: String,
}

impl TomlError {
    /// `e`, found while parsing `text`.
    pub fn new(e: &toml::de::Error, text: &str) -> TomlError {
        let message = e.message().trim_end().chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
        let place = e.span().map(|span| {
            let before = &text.as_bytes()[..span.start.min(text.len())];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            let column = String::from_utf8_lossy(&before[line_start..]).chars().count() + 1;
            (line, column)
        });
        TomlError { place, message }
    }
}

/// Parses `text` as a `T`, with errors that give the place, not the content.
pub fn from_str<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, TomlError> {
    toml::from_str(text).map_err(|e| TomlError::new(&e, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_give_line_and_column_without_the_line_itself() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct T {
            cpus: u32,
        }
        let e = from_str::<T>("cpus = 1\nroot:$y$SECRETHASH\n").unwrap_err();
        assert_eq!(e.place, Some((2, 5)), "{e}");
        assert!(e.to_string().starts_with("line 2, column 5: ") && !e.to_string().contains("SECRET"), "{e}");
    }
}
