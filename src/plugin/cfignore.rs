//! Which files of an app directory a push leaves out: Cloud Foundry's defaults, then the app's `.cfignore`, read
//! with `.gitignore` rules as the cf CLI documents (`*`, `**`, a leading `/` anchors to the app's root, a trailing
//! `/` matches directories only, `!` includes again). Pure: the caller reads the file.

use std::path::Path;

use ignore::gitignore::{Gitignore, GitignoreBuilder};

/// What the cf CLI leaves out of every push, whatever `.cfignore` says.
pub const DEFAULTS: &[&str] =
    &[".cfignore", "/manifest.yml", ".gitignore", ".git", ".hg", ".svn", "_darcs", ".DS_Store"];

/// The rules of one app directory.
pub struct CfIgnore {
    rules: Gitignore,
}

/// A line of `.cfignore` that is not a valid pattern.
#[derive(Debug, thiserror::Error)]
#[error(".cfignore: {0}")]
pub struct CfIgnoreError(String);

impl CfIgnore {
    /// The defaults and the lines of `cfignore` (the text of the app's `.cfignore`, if it has one), for the
    /// directory `root`.
    pub fn new(root: &Path, cfignore: Option<&str>) -> Result<Self, CfIgnoreError> {
        let mut builder = GitignoreBuilder::new(root);
        for line in DEFAULTS.iter().copied().chain(cfignore.into_iter().flat_map(str::lines)) {
            builder.add_line(None, line).map_err(|e| CfIgnoreError(e.to_string()))?;
        }
        Ok(CfIgnore { rules: builder.build().map_err(|e| CfIgnoreError(e.to_string()))? })
    }

    /// Whether `relative` (a path below the root, `/`-separated) is left out. A directory that is left out takes
    /// everything below it along: the walk does not enter it.
    pub fn ignores(&self, relative: &str, is_dir: bool) -> bool {
        self.rules.matched(relative, is_dir).is_ignore()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> CfIgnore {
        CfIgnore::new(Path::new("/app"), Some(text)).unwrap()
    }

    #[test]
    fn the_defaults_apply_without_a_cfignore() {
        let none = CfIgnore::new(Path::new("/app"), None).unwrap();
        for ignored in [".git", "sub/.git", ".cfignore", "manifest.yml", ".DS_Store", "a/.svn"] {
            assert!(none.ignores(ignored, ignored.ends_with("git") || ignored.ends_with("svn")), "{ignored}");
        }
        assert!(!none.ignores("config/manifest.yml", false), "only the root's manifest");
        assert!(!none.ignores("app.js", false));
    }

    #[test]
    fn gitignore_rules() {
        let rules = rules("*.log\n/build\ntmp/\n!keep.log\n# a comment\n\ndocs/**/*.md\n");
        assert!(rules.ignores("server.log", false));
        assert!(rules.ignores("deep/er/server.log", false));
        assert!(!rules.ignores("keep.log", false), "included again");
        assert!(rules.ignores("build", true));
        assert!(!rules.ignores("src/build", true), "anchored to the root");
        assert!(rules.ignores("tmp", true));
        assert!(rules.ignores("src/tmp", true));
        assert!(!rules.ignores("tmp", false), "a trailing slash: directories only");
        assert!(rules.ignores("docs/a/b/c.md", false));
        assert!(!rules.ignores("docs/a/b/c.txt", false));
    }
}
