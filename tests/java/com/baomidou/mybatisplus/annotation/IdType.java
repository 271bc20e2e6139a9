package com.baomidou.mybatisplus.annotation;

/**
 * The constants of MyBatis-Plus's IdType that the seed's entity uses, so it
 * compiles unchanged without MyBatis-Plus (which Debian does not package).
 */
public enum IdType {
    AUTO, NONE, INPUT, ASSIGN_ID, ASSIGN_UUID
}
