"""aptp.data"""
