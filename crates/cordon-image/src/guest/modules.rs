//! Which kernel modules the guest loads, and in what order: the closure of the modules it
//! needs over their `depends=` (read from each module's `.modinfo`, because the package ships
//! no `modules.dep`: depmod runs at install time), leaving out what is built in.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{ImageError, IoContext};
use crate::guest::elf;

/// Module names as the kernel spells them (`-` in file names becomes `_`).
pub(crate) fn module_name(file: &Path) -> Option<String> {
    let stem = file.file_name()?.to_str()?.strip_suffix(".ko")?;
    Some(stem.replace('-', "_"))
}

/// Every `*.ko` under `<modules dir>/kernel`, by module name.
pub(crate) fn index_modules(modules_dir: &Path) -> Result<BTreeMap<String, PathBuf>, ImageError> {
    let mut index = BTreeMap::new();
    for entry in walkdir::WalkDir::new(modules_dir.join("kernel")) {
        let entry = entry.map_err(|error| ImageError::Io {
            what: format!("list {}", modules_dir.display()),
            source: error.into(),
        })?;
        if entry.file_type().is_file() {
            if let Some(name) = module_name(entry.path()) {
                index.insert(name, entry.into_path());
            }
        }
    }
    Ok(index)
}

/// Names of the built-in modules (`modules.builtin`: one `kernel/…/name.ko` per line).
pub(crate) fn builtin_modules(modules_dir: &Path) -> Result<BTreeSet<String>, ImageError> {
    let path = modules_dir.join("modules.builtin");
    let text = fs::read_to_string(&path).context(|| format!("read {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|line| module_name(Path::new(line.trim())))
        .collect())
}

/// A module's direct dependencies, from its `.modinfo` `depends=` entry.
pub(crate) fn dependencies(module: &[u8]) -> Option<Vec<String>> {
    let modinfo = elf::section(module, ".modinfo")?;
    let depends = modinfo
        .split(|&b| b == 0)
        .find_map(|entry| entry.strip_prefix(b"depends="))
        .unwrap_or_default();
    Some(
        String::from_utf8_lossy(depends)
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(|name| name.replace('-', "_"))
            .collect(),
    )
}

/// The files to load, dependencies first, for `wanted` (built-in ones need nothing).
/// `deps_of` reads one module's dependencies (the real one reads the file).
pub(crate) fn load_order(
    wanted: &[&str],
    index: &BTreeMap<String, PathBuf>,
    builtin: &BTreeSet<String>,
    deps_of: &mut dyn FnMut(&Path) -> Result<Vec<String>, ImageError>,
) -> Result<Vec<PathBuf>, ImageError> {
    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    for name in wanted {
        visit(
            name,
            index,
            builtin,
            deps_of,
            &mut done,
            &mut Vec::new(),
            &mut order,
        )?;
    }
    Ok(order)
}

/// Depth-first: a module goes into `order` after everything it depends on.
fn visit(
    name: &str,
    index: &BTreeMap<String, PathBuf>,
    builtin: &BTreeSet<String>,
    deps_of: &mut dyn FnMut(&Path) -> Result<Vec<String>, ImageError>,
    done: &mut BTreeSet<String>,
    path: &mut Vec<String>,
    order: &mut Vec<PathBuf>,
) -> Result<(), ImageError> {
    if done.contains(name) || builtin.contains(name) {
        return Ok(());
    }
    if path.iter().any(|seen| seen == name) {
        return Err(ImageError::InvalidImage(format!(
            "kernel modules depend on each other in a cycle: {} -> {name}",
            path.join(" -> ")
        )));
    }
    let file = index.get(name).ok_or_else(|| {
        ImageError::InvalidImage(format!(
            "the guest kernel has no module {name} (needed by {})",
            path.last().map_or("the guest", String::as_str)
        ))
    })?;
    path.push(name.to_string());
    for dependency in deps_of(file)? {
        visit(&dependency, index, builtin, deps_of, done, path, order)?;
    }
    path.pop();
    done.insert(name.to_string());
    order.push(file.clone());
    Ok(())
}

/// [`dependencies`] of a module file.
pub(crate) fn dependencies_of_file(file: &Path) -> Result<Vec<String>, ImageError> {
    let bytes = fs::read(file).context(|| format!("read {}", file.display()))?;
    dependencies(&bytes).ok_or_else(|| {
        ImageError::InvalidImage(format!("{} has no readable .modinfo", file.display()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_tree(
        deps: &[(&str, &str)],
    ) -> (BTreeMap<String, PathBuf>, BTreeMap<PathBuf, Vec<String>>) {
        let mut index = BTreeMap::new();
        let mut graph = BTreeMap::new();
        for (name, depends) in deps {
            let path = PathBuf::from(format!("kernel/{}.ko", name.replace('_', "-")));
            let modinfo = format!("license=GPL\0depends={depends}\0vermagic=6.1\0");
            let elf = elf::build_with_sections(&[(".modinfo", modinfo.as_bytes())]);
            graph.insert(path.clone(), dependencies(&elf).unwrap());
            index.insert(name.to_string(), path);
        }
        (index, graph)
    }

    #[test]
    fn closure_puts_dependencies_first_once_and_skips_builtins() {
        let (index, graph) = fake_tree(&[
            ("virtio_ring", ""),
            ("virtio", "virtio_ring"),
            ("virtio_mmio", "virtio,virtio_ring"),
            ("virtio_blk", "virtio,virtio-ring"),
            ("overlay", ""),
            ("crc_thing", ""),
        ]);
        let builtin = BTreeSet::from(["ext4".to_string()]);
        let order = load_order(
            &["virtio_mmio", "virtio_blk", "ext4", "overlay"],
            &index,
            &builtin,
            &mut |file| Ok(graph[file].clone()),
        )
        .unwrap();
        let names: Vec<_> = order.iter().map(|p| module_name(p).unwrap()).collect();
        assert_eq!(
            names,
            [
                "virtio_ring",
                "virtio",
                "virtio_mmio",
                "virtio_blk",
                "overlay"
            ]
        );
    }

    #[test]
    fn missing_modules_and_cycles_are_errors() {
        let (index, graph) = fake_tree(&[("a", "b"), ("b", "a")]);
        let mut deps = |file: &Path| Ok(graph[file].clone());
        let cycle = load_order(&["a"], &index, &BTreeSet::new(), &mut deps).unwrap_err();
        assert!(cycle.to_string().contains("cycle"), "{cycle}");
        let missing = load_order(&["zz"], &index, &BTreeSet::new(), &mut deps).unwrap_err();
        assert!(missing.to_string().contains("no module zz"), "{missing}");
    }

    #[test]
    fn module_names_use_underscores() {
        assert_eq!(
            module_name(Path::new("x/virtio-rng.ko")).as_deref(),
            Some("virtio_rng")
        );
        assert_eq!(module_name(Path::new("x/readme.txt")), None);
    }
}
