package com.example.message;

import com.baomidou.mybatisplus.annotation.IdType;
import com.baomidou.mybatisplus.annotation.TableField;
import com.baomidou.mybatisplus.annotation.TableId;
import com.baomidou.mybatisplus.annotation.TableName;
import java.io.Serializable;
import java.time.LocalDateTime;
import lombok.Data;

/**
 * The message entity of a Spring Boot + MyBatis-Plus application, kept as it
 * is when notifyd takes over the push: notifyd reads the same table and the
 * same columns (unquoted upper-case names fold to PostgreSQL's lower case).
 */
@Data
@TableName("t_message_real_time")
public class MessageRealTime implements Serializable {

    private static final long serialVersionUID = 1L;

    /** Assigned by MyBatis-Plus before the INSERT (a snowflake id, as a string). */
    @TableId(value = "ID", type = IdType.ASSIGN_ID)
    private String id;

    @TableField("TITLE")
    private String title;

    @TableField("SEND_USER")
    private String sendUser;

    @TableField("TO_USER")
    private String toUser;

    @TableField("TYPE")
    private String type;

    @TableField("CONTENT")
    private String content;

    @TableField("SEND_TIME")
    private LocalDateTime sendTime;

    @TableField("SKIP_URL")
    private String skipUrl;

    /** "0" unread, "1" read. */
    @TableField("IS_READ")
    private String isRead;
}
