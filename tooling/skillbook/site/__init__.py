"""The static docs site: markdown rendering, link mapping, page data, pipeline graphs and the build."""
