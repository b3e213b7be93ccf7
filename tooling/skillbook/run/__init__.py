"""Running skills: the recipe contract and config layers, the runner and its RunContext, torchrun workers,
thread choice, pipelines with their step cache and reports, JSON Schemas, and executed code blocks."""
