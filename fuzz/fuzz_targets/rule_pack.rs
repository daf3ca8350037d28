//! The rule-pack loader and the incremental engine. Input: a rule file's text, a NUL byte, then
//! probe-protocol event lines. The rule file is loaded through the real `load_dir` (manifest +
//! one pack directory), compiled by `Engine::new`, and the events are fed through the graph and
//! the engine as the exporter's pipeline does, ending with a tick.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use ark_exporter::event::parse_line;
use ark_exporter::graph::{Graph, GraphLimits};
use ark_exporter::rules::{Engine, EngineConfig, load_dir};
use libfuzzer_sys::fuzz_target;

fn rules_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir").keep();
        std::fs::write(
            dir.join("manifest.yaml"),
            "version: 1\npacks:\n  - {name: fuzz, enabled: true, dir: pack}\n",
        )
        .expect("manifest");
        std::fs::create_dir_all(dir.join("pack")).expect("pack dir");
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let (rule, events) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let dir = rules_dir();
    std::fs::write(dir.join("pack/rule.yaml"), rule).expect("rule file");
    let Ok(set) = load_dir(dir, false) else {
        return;
    };
    let cfg = EngineConfig {
        default_window_ms: 60_000,
        max_keys: 16,
        ..EngineConfig::default()
    };
    let (mut engine, _rejected) = Engine::new(&set.rules, cfg);
    let mut graph = Graph::new(GraphLimits::default());
    graph.track_changes(true);
    let mut changes = Vec::new();
    for line in events.split(|&b| b == b'\n') {
        let Ok(ev) = parse_line(line) else { continue };
        graph.advance(ev.ts);
        graph.ingest(&ev);
        changes.clear();
        changes.extend(graph.drain_changes());
        engine.on_event(&ev, &graph, &changes);
    }
    graph.advance(graph.now().saturating_add(3_600_000));
    changes.clear();
    changes.extend(graph.drain_changes());
    engine.on_changes(&graph, &changes);
    engine.tick(graph.now());
    let _ = engine.active_scenes();
    let _ = engine.matches();
});
