//! guildgate: sells access to Discord servers. Payment events come in from RabbitMQ,
//! become grants, and reach Discord and the merchant's webhooks through an outbox.
//! See docs/architecture.md for the architecture; each module's doc says what it owns.

pub mod amqp;
pub mod app;
pub mod config;
pub mod crypto;
pub mod discord;
pub mod domain;
pub mod email;
pub mod events;
pub mod faults;
pub mod grants;
pub mod i18n;
pub mod lifecycle;
pub mod metrics;
pub mod nul;
pub mod outbox;
pub mod queue;
pub mod reconcile;
pub mod shares;
pub mod store;
pub mod sync;
pub mod telemetry;
pub mod web;
pub mod webhooks;

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::{Path, PathBuf};

    /// Every source file under `src/<under>` (all of `src` for `""`), recursively, with
    /// its path relative to `src` and its text; the layout tests read the code with it.
    pub(crate) fn sources(under: &str) -> Vec<(PathBuf, String)> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).expect("a source folder") {
                let path = entry.expect("a directory entry").path();
                if path.is_dir() {
                    walk(&path, out);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    out.push(path);
                }
            }
        }
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        walk(&src.join(under), &mut files);
        files
            .into_iter()
            .map(|path| {
                let text = std::fs::read_to_string(&path).expect("readable source");
                (
                    path.strip_prefix(&src).expect("under src").to_path_buf(),
                    text,
                )
            })
            .collect()
    }

    /// Every source file outside `src/<owner>`: where a layout test looks for what only
    /// `owner` may do. Fails if it read too few files to mean anything.
    pub(crate) fn sources_outside(owner: &str) -> Vec<(PathBuf, String)> {
        let files: Vec<_> = sources("")
            .into_iter()
            .filter(|(path, _)| !path.starts_with(owner))
            .collect();
        assert!(files.len() > 50, "read only {} files", files.len());
        files
    }

    /// The top-level modules a line names through `crate::`.
    pub(crate) fn crate_modules(line: &str) -> impl Iterator<Item = String> + '_ {
        line.match_indices("crate::")
            .map(move |(i, _)| {
                line[i + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
            .filter(|m| !m.is_empty())
    }

    /// Which top-level modules each top-level module's code (tests and comments aside)
    /// names through `crate::`.
    fn imports() -> BTreeMap<String, BTreeSet<String>> {
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (rel, text) in sources("") {
            let first = rel.components().next().expect("a file").as_os_str();
            let module = first.to_string_lossy().trim_end_matches(".rs").to_string();
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            let edges = graph.entry(module.clone()).or_default();
            for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
                edges.extend(crate_modules(line).filter(|to| *to != module));
            }
        }
        graph
    }

    /// A circle of imports through `from`, if there is one.
    fn circle(
        graph: &BTreeMap<String, BTreeSet<String>>,
        from: &str,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|m| m == from) {
            return Some(path[at..].to_vec());
        }
        path.push(from.to_string());
        for to in graph.get(from).into_iter().flatten() {
            if let Some(c) = circle(graph, to, path) {
                return Some(c);
            }
        }
        path.pop();
        None
    }

    /// Imports go one way: from the edges (the app, the web, the consumers) down to the
    /// store and the domain, never around in a circle.
    #[test]
    fn no_module_imports_its_way_back_to_itself() {
        let graph = imports();
        assert!(graph.len() > 15, "read only {} modules", graph.len());
        for module in graph.keys() {
            if let Some(c) = circle(&graph, module, &mut Vec::new()) {
                panic!("an import circle: {} -> {}", c.join(" -> "), c[0]);
            }
        }
    }
}
