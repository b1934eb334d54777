"""aptp.routers"""
