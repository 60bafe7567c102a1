//! One router for every plugin's routes: path patterns (`/hello/{name}`, `/files/{*rest}`)
//! matched with `matchit`, then the method. A known path with another method is a 405
//! with `Allow`; anything else a 404. Two plugins claiming the same method and path, or
//! patterns that cannot coexist, fail the generation naming both files.

use baton_loader::{Plugin, method_names};
use baton_plugin::abi::method;
use std::sync::Arc;

/// Who serves a method on a path.
#[derive(Debug, Clone)]
struct Target {
    methods: u32,
    plugin: usize,
    route: u32,
}

#[derive(Debug)]
struct Entry {
    pattern: String,
    targets: Vec<Target>,
}

#[derive(Debug)]
pub struct Router {
    paths: matchit::Router<usize>,
    entries: Vec<Entry>,
    pub plugins: Vec<Arc<Plugin>>,
}

/// The result of routing a request.
#[derive(Debug)]
pub enum Lookup<'a> {
    Found {
        /// Index of the plugin in [`Router::plugins`].
        index: usize,
        plugin: &'a Arc<Plugin>,
        route: u32,
        params: Vec<(String, String)>,
    },
    /// The path exists, the method does not: these are allowed.
    MethodNotAllowed(String),
    NotFound,
}

impl Router {
    /// Builds the router, refusing duplicate and conflicting routes and any route on the
    /// reserved health path.
    pub fn build(plugins: Vec<Arc<Plugin>>, health_path: &str) -> Result<Router, String> {
        let mut entries: Vec<Entry> = Vec::new();
        for (p, plugin) in plugins.iter().enumerate() {
            for (r, route) in plugin.routes.iter().enumerate() {
                if route.pattern == health_path {
                    return Err(format!(
                        "plugin {} ({}): route {} is the health path (http.health_path)",
                        plugin.spec.file, plugin.name, route.pattern
                    ));
                }
                let target = Target {
                    methods: route.methods,
                    plugin: p,
                    route: r as u32,
                };
                match entries.iter_mut().find(|e| e.pattern == route.pattern) {
                    Some(entry) => {
                        if let Some(other) = entry
                            .targets
                            .iter()
                            .find(|t| t.methods & route.methods != 0)
                        {
                            let o = &plugins[other.plugin];
                            return Err(format!(
                                "duplicate route {} {}: claimed by plugin {} ({}) and plugin {} ({})",
                                method_names(other.methods & route.methods),
                                route.pattern,
                                o.spec.file,
                                o.name,
                                plugin.spec.file,
                                plugin.name
                            ));
                        }
                        entry.targets.push(target);
                    }
                    None => entries.push(Entry {
                        pattern: route.pattern.clone(),
                        targets: vec![target],
                    }),
                }
            }
        }
        let mut paths = matchit::Router::new();
        for (i, entry) in entries.iter().enumerate() {
            if let Err(e) = paths.insert(entry.pattern.clone(), i) {
                let owner = |e: &Entry| {
                    let p = &plugins[e.targets[0].plugin];
                    format!("plugin {} ({})", p.spec.file, p.name)
                };
                let clash = entries[..i]
                    .iter()
                    .find(|other| conflicts(&other.pattern, &entry.pattern))
                    .map(|other| format!(" and {} of {}", other.pattern, owner(other)))
                    .unwrap_or_default();
                return Err(format!(
                    "route {} of {} cannot be routed{clash}: {e}",
                    entry.pattern,
                    owner(entry)
                ));
            }
        }
        Ok(Router {
            paths,
            entries,
            plugins,
        })
    }

    pub fn lookup(&self, method_name: &str, path: &str) -> Lookup<'_> {
        let Ok(matched) = self.paths.at(path) else {
            return Lookup::NotFound;
        };
        let entry = &self.entries[*matched.value];
        let want = method::bit(method_name).unwrap_or(0);
        let target = entry
            .targets
            .iter()
            .find(|t| t.methods & want != 0)
            .or_else(|| {
                // A GET route answers HEAD too (hyper sends no body for HEAD).
                (want == method::HEAD)
                    .then(|| entry.targets.iter().find(|t| t.methods & method::GET != 0))
                    .flatten()
            });
        match target {
            Some(t) => Lookup::Found {
                index: t.plugin,
                plugin: &self.plugins[t.plugin],
                route: t.route,
                params: matched
                    .params
                    .iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
            },
            None => {
                let mut bits = entry.targets.iter().fold(0, |acc, t| acc | t.methods);
                if bits & method::GET != 0 {
                    bits |= method::HEAD;
                }
                Lookup::MethodNotAllowed(method_names(bits).replace('|', ", "))
            }
        }
    }

    /// Every route, as `METHODS PATTERN`, per plugin.
    pub fn describe(plugin: &Plugin) -> Vec<String> {
        plugin
            .routes
            .iter()
            .map(|r| format!("{} {}", method_names(r.methods), r.pattern))
            .collect()
    }
}

/// Whether two patterns are the kind matchit refuses together (same static prefix up to a
/// parameter); used only to name the other route in the error.
fn conflicts(a: &str, b: &str) -> bool {
    let prefix = |s: &str| s.find('{').map_or(s.len(), |i| i).min(s.len());
    let (pa, pb) = (prefix(a), prefix(b));
    a[..pa.min(pb)] == b[..pa.min(pb)]
}
