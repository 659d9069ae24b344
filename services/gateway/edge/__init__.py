"""The gateway's HTTP edge, one layer a module; services/gateway/middleware.py stacks them."""
