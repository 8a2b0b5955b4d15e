"""Tooling around the services: the demo, the shapes model's recipe (`shapes_vl`) and the support
package of tests, benchmarks and the demo (`testkit`). The services never import it."""
