"""The HTTP edge (DESIGN.md §3): the app factory, routers, schemas, middleware and error mapping."""
