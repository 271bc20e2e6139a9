package com.example.message;

import com.baomidou.mybatisplus.annotation.IdType;
import com.baomidou.mybatisplus.annotation.TableField;
import com.baomidou.mybatisplus.annotation.TableId;
import com.baomidou.mybatisplus.annotation.TableName;
import java.lang.reflect.Field;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.SQLException;
import java.time.LocalDateTime;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Objects;

/**
 * What {@code messageService.saveBatch(messages)} sends to PostgreSQL, in
 * plain JDBC: MyBatis-Plus's batch insert of {@link MessageRealTime}.
 *
 * <p>Like MyBatis-Plus it assigns each {@code IdType.ASSIGN_ID} id before the
 * INSERT (a snowflake id as a string), builds the INSERT from the entity's
 * annotations with the columns whose values are not null, queues the rows as
 * one JDBC batch (a new statement whenever the column list changes) and
 * commits once. notifyd needs nothing more: the table's trigger wakes it on
 * commit, and every row reaches its user's sessions.
 *
 * <p>Run: {@code java -cp .:postgresql.jar com.example.message.MessageBatch
 * 'jdbc:postgresql://127.0.0.1:5432/app?user=app' 250 alice,bob,carol}. It
 * prints each saved entity as one JSON line.
 */
public final class MessageBatch {

    /** MyBatis-Plus's default batch size: rows flushed per executeBatch. */
    private static final int BATCH_SIZE = 1000;

    private MessageBatch() {}

    public static void main(String[] args) throws Exception {
        String url = args[0];
        int count = Integer.parseInt(args[1]);
        String[] users = args[2].split(",");
        List<MessageRealTime> messages = new ArrayList<>();
        for (int i = 0; i < count; i++) {
            MessageRealTime message = new MessageRealTime();
            message.setTitle("订单已发货 #" + i);
            message.setContent("Parcel " + i + " is on its way: \"express\" \\ line two\n");
            message.setType(i % 3 == 0 ? "system" : "order");
            message.setSendUser("admin");
            message.setToUser(users[i % users.length]);
            message.setSendTime(LocalDateTime.now());
            // Leaving a field null leaves its column out of the INSERT.
            message.setSkipUrl(i % 2 == 0 ? "/orders/" + i : null);
            message.setIsRead("0");
            messages.add(message);
        }
        try (Connection connection = DriverManager.getConnection(url)) {
            saveBatch(connection, messages);
        }
        for (MessageRealTime message : messages) {
            System.out.println(toJson(message));
        }
    }

    /**
     * Insert {@code messages} in one transaction, as JDBC batches.
     */
    static void saveBatch(Connection connection, List<MessageRealTime> messages)
            throws SQLException, ReflectiveOperationException {
        String table = MessageRealTime.class.getAnnotation(TableName.class).value();
        connection.setAutoCommit(false);
        try {
            PreparedStatement statement = null;
            String statementSql = null;
            int queued = 0;
            for (MessageRealTime message : messages) {
                Map<String, Object> columns = columnsOf(message);
                String sql = "INSERT INTO " + table + " ( " + String.join(", ", columns.keySet())
                        + " ) VALUES ( " + String.join(", ", columns.keySet().stream().map(c -> "?").toList())
                        + " )";
                if (!sql.equals(statementSql)) {
                    if (statement != null) {
                        statement.executeBatch();
                        statement.close();
                    }
                    statement = connection.prepareStatement(sql);
                    statementSql = sql;
                    queued = 0;
                }
                int index = 1;
                for (Object value : columns.values()) {
                    statement.setObject(index++, value);
                }
                statement.addBatch();
                if (++queued % BATCH_SIZE == 0) {
                    statement.executeBatch();
                }
            }
            if (statement != null) {
                statement.executeBatch();
                statement.close();
            }
            connection.commit();
        } catch (SQLException | ReflectiveOperationException | RuntimeException e) {
            connection.rollback();
            throw e;
        }
    }

    /**
     * The entity's columns with their values, in field order, without the
     * null ones (MyBatis-Plus's default NOT_NULL insert strategy); assigns
     * the ASSIGN_ID id first.
     */
    private static Map<String, Object> columnsOf(MessageRealTime message)
            throws ReflectiveOperationException {
        Map<String, Object> columns = new LinkedHashMap<>();
        for (Field field : MessageRealTime.class.getDeclaredFields()) {
            TableId id = field.getAnnotation(TableId.class);
            TableField column = field.getAnnotation(TableField.class);
            if (id == null && (column == null || !column.exist())) {
                continue;
            }
            field.setAccessible(true);
            if (id != null && id.type() == IdType.ASSIGN_ID && field.get(message) == null) {
                field.set(message, Snowflake.nextIdString());
            }
            Object value = field.get(message);
            if (value != null) {
                columns.put(id != null ? id.value() : column.value(), value);
            }
        }
        return columns;
    }

    /**
     * MyBatis-Plus's default ASSIGN_ID generator: 41 bits of milliseconds
     * since its epoch, 10 bits of worker, 12 bits of sequence.
     */
    static final class Snowflake {
        private static final long EPOCH = 1288834974657L;
        private static final long WORKER = 1L;
        private static long lastMillis = -1L;
        private static long sequence = 0L;

        static synchronized String nextIdString() {
            long now = System.currentTimeMillis();
            if (now == lastMillis) {
                sequence = (sequence + 1) & 4095;
                if (sequence == 0) {
                    while (now <= lastMillis) {
                        now = System.currentTimeMillis();
                    }
                }
            } else {
                sequence = 0;
            }
            lastMillis = now;
            return Long.toString(((now - EPOCH) << 22) | (WORKER << 12) | sequence);
        }
    }

    private static String toJson(MessageRealTime m) {
        Map<String, Object> fields = new LinkedHashMap<>();
        fields.put("id", m.getId());
        fields.put("title", m.getTitle());
        fields.put("sendUser", m.getSendUser());
        fields.put("toUser", m.getToUser());
        fields.put("type", m.getType());
        fields.put("content", m.getContent());
        fields.put("sendTime", m.getSendTime() == null ? null : m.getSendTime().toString());
        fields.put("skipUrl", m.getSkipUrl());
        fields.put("isRead", m.getIsRead());
        StringBuilder json = new StringBuilder("{");
        for (Map.Entry<String, Object> entry : fields.entrySet()) {
            if (json.length() > 1) {
                json.append(',');
            }
            json.append(quote(entry.getKey())).append(':');
            json.append(entry.getValue() == null ? "null" : quote(Objects.toString(entry.getValue())));
        }
        return json.append('}').toString();
    }

    private static String quote(String text) {
        StringBuilder out = new StringBuilder("\"");
        for (char c : text.toCharArray()) {
            switch (c) {
                case '"' -> out.append("\\\"");
                case '\\' -> out.append("\\\\");
                case '\n' -> out.append("\\n");
                case '\r' -> out.append("\\r");
                case '\t' -> out.append("\\t");
                default -> {
                    if (c < 0x20) {
                        out.append(String.format("\\u%04x", (int) c));
                    } else {
                        out.append(c);
                    }
                }
            }
        }
        return out.append('"').toString();
    }
}
