"""What both services use besides the wire contract: hand-built gRPC handlers, start-up and
configuration errors, argparse types for sizes and dtypes, the bearer-key check and the port file.

It may import `shared` and third-party libraries, never either service.
"""
