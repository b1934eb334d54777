"""aptp.metrics"""
